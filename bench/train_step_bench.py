"""One pretraining step, med3d (examples/train_step_bench.rs, tch) vs the
same model in PyTorch eager, on the same CPU threads, side by side.

    .venv/bin/python bench/train_step_bench.py [--config experiments/demo.yaml] [--threads 1,all]
        [--steps 5] [--warmup 2] [--size 64] [--batch 4] [--feature-size 12]
        [--device cpu|cuda] [--bf16] [--json OUT]

On CUDA (--device cuda; --bf16 for bf16 autocast on both sides, as
`med3d pretrain` uses on a GPU) each step ends with a device synchronize,
and both sides report the CUDA caching allocator's peak allocated bytes.

The model is whatever the config's `pretrain` section says (med3d prints
its settings and PyTorch builds from them): MONAI's SwinUNETR with the same
arguments (feature_size, depths, heads, window, downsample, use_v2), the
PSAT (learned queries + plane/slice embedding added to queries and memory
+ torch.nn.TransformerDecoder, post-norm, final LayerNorm + one linear
read-out of query 0), the learnable diagonal Mahalanobis cost, partial OT
with the same eps / mass / iterations (a torch port of med3d's log-domain
solver, differentiated by autograd through every iteration), the plan
cross-entropy + w_recon * MSE(reconstruction, input), then
clip_grad_norm_ and torch.optim.AdamW (or Adam). Inputs: random volumes
[B, 1, S, S, S], random planes and bins, random 384-d text targets; the
same for every step. Warm-up steps are excluded; median of --steps.

med3d's CPU step also sets glibc's allocator to keep freed memory
(mallopt: no mmap for large blocks, never trim; README, pretrain); the
PyTorch side is timed as it runs by default and again with the same
settings (the same two mallopt calls, through ctypes, before torch is
imported) when --pytorch-malloc both (the default).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
EXAMPLE = TARGET / "release" / "examples" / "train_step_bench"


def same_mallopt():
    """The allocator setting med3d's CPU training sets for itself
    (src/runtime/memory.rs), the same two mallopt calls: no mmap for large
    blocks, never trim the heap (-1 is SIZE_MAX in glibc)."""
    import ctypes

    libc = ctypes.CDLL(None)
    libc.mallopt(-4, 0)  # M_MMAP_MAX
    libc.mallopt(-1, -1)  # M_TRIM_THRESHOLD


def torch_side(spec, steps, warmup, threads):
    if os.environ.get("MED3D_BENCH_MALLOPT") == "1":
        same_mallopt()
    import torch
    from monai.networks.nets import SwinUNETR

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device("cuda" if spec.get("device", "Cpu").startswith("Cuda") else "cpu")
    bf16 = bool(spec.get("bf16")) and dev.type == "cuda"
    bb, ps, al, op = spec["backbone"], spec["psat"], spec["align"], spec["optimizer"]
    if spec["head"] != "psat" or al["loss"] != "pot":
        raise SystemExit("this bench covers head: psat with align.loss: pot")
    net = SwinUNETR(
        in_channels=1, out_channels=1, feature_size=bb["feature_size"], depths=bb["depths"],
        num_heads=bb["num_heads"], window_size=bb["window_size"], patch_size=bb["patch_size"],
        mlp_ratio=bb["mlp_ratio"], qkv_bias=bb["qkv_bias"], drop_rate=bb["drop_rate"],
        attn_drop_rate=bb["attn_drop_rate"], dropout_path_rate=bb["dropout_path_rate"],
        normalize=bb["normalize"], patch_norm=bb["patch_norm"], downsample=bb["downsample"],
        use_v2=bb["use_v2"], spatial_dims=3,
    )
    dim = 16 * bb["feature_size"]
    ffn = ps["ffn"] or 4 * dim

    class Psat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plane_slice_embed = torch.nn.Embedding(3 * ps["bins"], dim)
            self.query_embed = torch.nn.Embedding(ps["queries"], dim)
            layer = torch.nn.TransformerDecoderLayer(dim, ps["heads"], ffn, dropout=ps["dropout"], batch_first=True)
            self.decoder = torch.nn.TransformerDecoder(layer, ps["layers"], norm=torch.nn.LayerNorm(dim))
            self.proj = torch.nn.Linear(dim, spec["text_dim"])

        def forward(self, memory, planes, bins):
            pse = self.plane_slice_embed(planes * ps["bins"] + bins).unsqueeze(1)
            q = self.query_embed.weight.unsqueeze(0).expand(memory.shape[0], -1, -1) + pse
            out = self.decoder(q, memory + pse)
            return self.proj(out[:, 0])

    net = net.to(dev)
    psat = Psat().to(dev)
    metric = torch.nn.Parameter(torch.rand(spec["text_dim"], device=dev) + 1.0)
    params = list(net.parameters()) + list(psat.parameters()) + [metric]
    kind = torch.optim.AdamW if op["kind"] == "adamw" else torch.optim.Adam
    opt = kind(params, lr=op["lr"], betas=tuple(op["betas"]), eps=op["eps"], weight_decay=op["weight_decay"])

    def forward(x):
        # MONAI's SwinUNETR.forward, keeping the bottleneck for the PSAT
        h = net.swinViT(x, net.normalize)
        enc0, enc1 = net.encoder1(x), net.encoder2(h[0])
        enc2, enc3 = net.encoder3(h[1]), net.encoder4(h[2])
        dec4 = net.encoder10(h[4])
        dec0 = net.decoder2(net.decoder3(net.decoder4(net.decoder5(dec4, h[3]), enc3), enc2), enc1)
        return net.out(net.decoder1(dec0, enc0)), h[4]

    def partial_ot_log(cost, eps, mass, iters):
        # med3d's log-domain solver (src/align/ot.rs), in torch
        n, m = cost.shape[-2:]
        la, lb, lm = -torch.log(torch.tensor(float(n))), -torch.log(torch.tensor(float(m))), torch.log(torch.tensor(mass))
        raw = -cost / eps
        l0 = raw + lm - torch.logsumexp(raw.flatten(-2), -1)[..., None, None]
        r = torch.zeros_like(l0[..., :, :1])
        c = torch.zeros_like(l0[..., :1, :])
        s = torch.zeros_like(l0[..., :1, :1])
        for _ in range(iters):
            r = torch.clamp_max(la - s - torch.logsumexp(l0 + c, -1, keepdim=True), 0.0)
            col = torch.logsumexp(l0 + r, -2, keepdim=True)
            c = torch.clamp_max(lb - s - col, 0.0)
            s = lm - torch.logsumexp(col + c, -1, keepdim=True)
        return l0 + r + c + s

    b, side = spec["batch"], spec["side"]
    x = torch.rand(b, 1, side, side, side, device=dev)
    planes = torch.randint(0, 3, (b,), device=dev)
    bins = torch.randint(0, ps["bins"], (b,), device=dev)
    y = torch.randn(b, spec["text_dim"], device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    w = spec["weights"]
    net.train()
    psat.train()
    times = []
    parts = []  # per timed step: forward incl. the losses, backward, optimiser (ms)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(warmup + steps):
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits, bott = forward(x)
            mem = bott.flatten(2).transpose(1, 2)
            e = psat(mem, planes, bins)
        # the alignment in float32, as med3d's autocast leaves it
        logits, e = logits.float(), e.float()
        xn = e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mw = metric.clamp_min(0.0)
        xw = xn * mw
        d2 = (xw * xn).sum(-1, keepdim=True) + (yn * mw * yn).sum(-1)[None, :] - 2 * xw @ yn.T
        cost = d2.clamp_min(1e-12).sqrt()
        cost = cost / cost.max()
        lp = partial_ot_log(cost, al["eps"], al["mass"], al["max_iter"])
        pot = -(torch.diagonal(lp).sum() / b)
        with torch.no_grad():
            plan = lp.detach().exp()
            _ = (plan.sum(), plan.diagonal().sum())
        loss = w["text"] * pot + w["recon"] * torch.nn.functional.mse_loss(logits, x)
        _ = loss.item()  # med3d reads the loss value here too
        sync()
        t_fwd = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        sync()
        t_bwd = time.perf_counter()
        if op["clip_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, op["clip_grad_norm"])
        else:
            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            end = time.perf_counter()
            times.append((end - t) * 1e3)
            parts.append(((t_fwd - t) * 1e3, (t_bwd - t_fwd) * 1e3, (end - t_bwd) * 1e3))
    return {"step_ms": times, "median_ms": statistics.median(times), "last_loss": loss.item(),
            "parameters": sum(p.numel() for p in params),
            "peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
            # this worker process's peak resident memory (Linux: KiB)
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "forward_ms": statistics.median(p[0] for p in parts),
            "backward_ms": statistics.median(p[1] for p in parts),
            "optimizer_ms": statistics.median(p[2] for p in parts)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "experiments" / "demo.yaml"))
    ap.add_argument("--threads", default="1,all")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--size", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--feature-size", type=int)
    ap.add_argument("--pytorch-malloc", default="both", choices=["default", "both"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--json", help="also write the rows as JSON to this file")
    ap.add_argument("--example", default=str(EXAMPLE), help="the train_step_bench binary")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(torch_side(spec, args.steps, args.warmup, spec["threads"])))
        return
    example = Path(args.example)
    if not example.exists():
        sys.exit(f"{example} is missing: run `cargo build --release --example train_step_bench` first")
    extra = []
    for k in ("size", "batch", "feature_size"):
        if getattr(args, k) is not None:
            extra += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    rows = []
    for t in args.threads.split(","):
        n = os.cpu_count() if t == "all" else int(t)
        ours = json.loads(subprocess.run(
            [str(example), args.config, "--threads", str(n), "--steps", str(args.steps),
             "--warmup", str(args.warmup), "--device", args.device, "--bf16", str(args.bf16).lower(), *extra],
            check=True, capture_output=True, text=True).stdout)
        print(json.dumps({k: ours[k] for k in ("threads", "batch", "side", "parameters", "step_ms", "median_ms")}),
              file=sys.stderr, flush=True)
        variants = [("default", {})]
        if args.pytorch_malloc == "both" and args.device == "cpu":
            variants.append(("malloc", {"MED3D_BENCH_MALLOPT": "1"}))
        for label, env in variants:
            theirs = json.loads(subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(ours), "--steps", str(args.steps),
                 "--warmup", str(args.warmup)],
                check=True, capture_output=True, text=True, env={**os.environ, **env}).stdout)
            print(json.dumps({"pytorch": label, **theirs}), file=sys.stderr, flush=True)
            rows.append((n, ours, label, theirs))
    if args.json:
        Path(args.json).write_text(json.dumps([{"threads": n, "pytorch_allocator": label, "med3d": ours, "pytorch": theirs}
                                               for n, ours, label, theirs in rows], indent=1))
    print("per part, median ms (forward includes the losses and the alignment solver):")
    print("| threads | PyTorch allocator | forward med3d / PyTorch | backward med3d / PyTorch | optimiser med3d / PyTorch |")
    print("|---|---|---|---|---|")
    for n, ours, label, theirs in rows:
        cell = lambda k: f"{ours[k]:.0f} / {theirs[k]:.0f}"
        print(f"| {n} | {label} | {cell('forward_ms')} | {cell('backward_ms')} | {cell('optimizer_ms')} |")
    bb = rows[0][1]["backbone"]
    print(f"\none training step, SwinUNETR(feature_size {bb['feature_size']}, depths {bb['depths']}, "
          f"downsample {bb['downsample']}, use_v2 {bb['use_v2']}) + PSAT + partial OT "
          f"({rows[0][1]['align']['max_iter']} iterations) + AdamW; median of {args.steps} after {args.warmup} warm-up (s)")
    print("| threads | batch | input | med3d | PyTorch | PyTorch allocator | med3d / PyTorch | peak RSS GB (med3d / PyTorch) | parameters (med3d / PyTorch) |")
    print("|---|---|---|---|---|---|---|---|---|")
    gb = lambda r: f"{r['peak_rss_bytes'] / 1e9:.2f}" if r.get("peak_rss_bytes") else "-"
    for n, ours, label, theirs in rows:
        print(f"| {n} | {ours['batch']} | {ours['side']}^3 | {ours['median_ms'] / 1e3:.2f} | "
              f"{theirs['median_ms'] / 1e3:.2f} | {label} | {ours['median_ms'] / theirs['median_ms']:.2f} | "
              f"{gb(ours)} / {gb(theirs)} | {ours['parameters']} / {theirs['parameters']} |")
    # the ratio line, last
    print("ratio med3d / PyTorch step time (peak RSS): " + "; ".join(
        f"threads {n} PyTorch allocator {label}: {ours['median_ms'] / theirs['median_ms']:.2f}"
        + (f" ({ours['peak_rss_bytes'] / theirs['peak_rss_bytes']:.2f})"
           if ours.get("peak_rss_bytes") and theirs.get("peak_rss_bytes") else "")
        for n, ours, label, theirs in rows))


if __name__ == "__main__":
    main()
