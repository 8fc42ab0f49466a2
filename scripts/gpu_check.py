"""One-shot GPU check: everything med3d does on a GPU, once, into one JSON report.

    scripts/gpu_check.sh [--cpu] [--out gpu_check.json] [--bundle DIR]
    scripts/gpu_check.sh --prepare DIR      # on the build machine: what to carry

Sections (each one records ok / error / skipped-with-why; one failing does
not stop the others):
  doctor       `med3d doctor --json`
  pretrain     the paper preset (experiments/paper.yaml: SwinUNETR feature_size
               48, 6-layer PSAT, partial OT, batch 10, 128^3, bf16) for --steps
               steps on the bundled cache: volumes/s, peak GPU memory, the
               loader's share of step time
  precision    the same run's first steps in bf16 and float32: loss agreement
  eager        the same model and step in PyTorch eager (bench/train_step_bench.py,
               MONAI's SwinUNETR) on the same device: med3d / PyTorch step time
  ot           the partial-OT solver on the device (libtorch autograd) against
               the CPU fused solver: plan and gradient, and their times
  embed        MiniLM text embeddings on the device against the CPU
  nccl         a world-size-1 data-parallel pretrain (rank 0 alone, NCCL on a
               GPU, Gloo with --cpu) against the single-process run

--cpu runs every section on the CPU with the shapes shrunk to what 2 cores
finish in a few minutes, so the script's first GPU run is not its first run.

The bundle (--prepare DIR, made on the machine that built med3d: the folder
and DIR.tar.xz, ~50 MiB, under the device's 64 MiB): stripped med3d,
ot_bench and train_step_bench; a cache
of the demo volumes preprocessed as the paper preset does (1.5 mm, 128^3)
with descriptor captions and MiniLM text embeddings; MiniLM's weights in
float16 (the embed section compares device and CPU on those same weights);
MONAI's wheel. On the GPU machine:
    tar -xJf DIR.tar.xz && pip install --no-deps DIR/wheels/*.whl
    LD_LIBRARY_PATH=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib \\
        scripts/gpu_check.sh --bundle DIR --out $OUT/gpu_check.json
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, env=None, timeout=None, check=True):
    t = time.perf_counter()
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}: {p.stderr.strip()[-2000:]}")
    return p, time.perf_counter() - t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


# ---------------------------------------------------------------- configs
def yaml_dump(d, indent=0):
    """A YAML subset (maps, lists of scalars, scalars): enough for our configs."""
    out = []
    pad = "  " * indent
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"{pad}{k}:")
            out.append(yaml_dump(v, indent + 1))
        elif isinstance(v, list):
            out.append(f"{pad}{k}: [{', '.join(json.dumps(x) for x in v)}]")
        else:
            out.append(f"{pad}{k}: {json.dumps(v)}")
    return "\n".join(out)


def paper_pretrain(cpu, steps):
    """The paper preset's pretrain section (experiments/paper.yaml), run for `steps` steps."""
    import_yaml = None
    try:
        import yaml as import_yaml
    except ImportError:
        pass
    if import_yaml is not None:
        p = import_yaml.safe_load((ROOT / "experiments" / "paper.yaml").read_text())["pretrain"]
    else:  # the device machine may lack PyYAML: the preset's values, as in paper.yaml
        p = {
            "seed": 0, "precision": "auto",
            "backbone": {"feature_size": 48, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                         "downsample": "mergingv2", "fused_attention": True},
            "head": "psat",
            "psat": {"layers": 6, "heads": 8, "ffn": 0, "queries": 300, "bins": 128, "bin_mode": "normalized",
                     "dropout": 0.1},
            "align": {"loss": "pot", "eps": 0.03, "mass": 0.95, "max_iter": 1000, "tol": 0.0},
            "weights": {"text": 1.0, "image": 1.0, "recon": 1.0},
            "optimizer": {"kind": "adam", "lr": 1.0e-5, "weight_decay": 1.0e-5, "schedule": "constant",
                          "warmup_steps": 0, "clip_grad_norm": 0.0, "accumulate": 1},
            "batch_size": 10, "epochs": 100, "sampling": "case",
            "run": {"device": "auto", "workers": 4, "prefetch": 2, "checkpoint_every": 500, "keep_checkpoints": 2,
                    "max_nonfinite": 10},
        }
    p = dict(p)
    # operational settings live in pretrain.run (flat keys of older configs too)
    run = dict(p.pop("run", {}))
    for k in ("device", "threads", "workers", "prefetch", "checkpoint_every", "keep_checkpoints", "max_nonfinite",
              "dist_timeout_s", "keep_freed_memory"):
        if k in p:
            run[k] = p.pop(k)
    p["run"] = run
    p.pop("epochs", None)
    p["max_steps"] = steps
    run["checkpoint_every"] = 1000000
    p["input_size"] = [128, 128, 128]
    # the demo cache has 3 volumes: slice sampling keeps batches of 10 full
    p["sampling"] = "slice"
    if cpu:
        run["device"] = "cpu"
        p["backbone"] = {**p["backbone"], "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]}
        p["psat"] = {**p["psat"], "layers": 1, "heads": 2, "queries": 8, "bins": 16}
        p["align"] = {**p["align"], "max_iter": 50}
        p["batch_size"] = 2
        p["input_size"] = [64, 64, 64]
        run["workers"] = 2
        run["threads"] = max(1, os.cpu_count() or 1)
    else:
        run["device"] = "cuda"
    return p


def write_experiment(path, pretrain, workdir):
    path.write_text(f"name: gpu-check\nmanifest: m.yaml\nworkdir: {json.dumps(str(workdir))}\npretrain:\n"
                    + yaml_dump(pretrain, 1) + "\n")
    return path


# ---------------------------------------------------------------- sections
def section_doctor(ctx):
    p, _ = run([ctx.bin, "doctor", "--json"])
    return json.loads(p.stdout)


def pretrain_once(ctx, name, pretrain, env=None):
    out = ctx.work / name
    cfg = write_experiment(ctx.work / f"{name}.yaml", pretrain, ctx.work)
    p, wall = run([ctx.bin, "pretrain", "--config", cfg, "--cache", ctx.cache, "--out", out], env=env,
                  timeout=ctx.timeout)
    summary = json.loads((out / "summary.json").read_text())
    return out, summary, wall, p.stderr


def section_pretrain(ctx):
    pre = paper_pretrain(ctx.cpu, ctx.steps)
    pre["precision"] = "bf16"
    out, s, wall, _ = pretrain_once(ctx, "paper-bf16", pre)
    m = metrics(out)
    # the first step pays for kernel selection and warm-up: left out of rates
    steady = m[1:] or m
    step_s = [x["volumes_per_s"] and (pre["batch_size"] / x["volumes_per_s"]) for x in steady]
    wait = [x["data_wait_s"] for x in steady]
    ctx.bf16_run = m
    return {
        "config": pre,
        "steps": s["steps_run"],
        "device": s["device"],
        "autocast_bf16": s["autocast_bf16"],
        "parameters": s["parameters"],
        "first_loss": s["first_loss"],
        "last_loss": s["last_loss"],
        "volumes_per_s_steady": pre["batch_size"] * len(steady) / sum(step_s),
        "volumes_per_s_run": s["volumes_per_s"],
        "median_step_s": statistics.median(step_s),
        "loader_share": sum(wait) / sum(step_s),
        "peak_cuda_allocated_bytes": s.get("peak_cuda_allocated_bytes"),
        "peak_cuda_reserved_bytes": s.get("peak_cuda_reserved_bytes"),
        "peak_rss_bytes": s.get("peak_rss_bytes"),
        "wall_s": wall,
    }


def section_precision(ctx):
    k = ctx.precision_steps
    pre = paper_pretrain(ctx.cpu, k)
    pre["precision"] = "fp32"
    out, s, _, _ = pretrain_once(ctx, "paper-fp32", pre)
    fp32 = [x["loss"] for x in metrics(out)]
    bf16 = [x["loss"] for x in (ctx.bf16_run or [])[:k]]
    if len(bf16) < k:
        pre["precision"] = "bf16"
        out, _, _, _ = pretrain_once(ctx, "paper-bf16-short", pre)
        bf16 = [x["loss"] for x in metrics(out)]
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(bf16, fp32)]
    return {"steps": k, "bf16_loss": bf16, "fp32_loss": fp32, "max_rel_diff": max(rel),
            "note": None if not ctx.cpu else "bf16 autocast is CUDA-only: on the CPU both runs are float32"}


def section_eager(ctx):
    if ctx.train_step_bench is None:
        return {"skipped": "train_step_bench binary not found (build: cargo build --release --example train_step_bench)"}
    try:
        import monai  # noqa: F401
    except ImportError:
        return {"skipped": "MONAI is not installed (the bundle carries its wheel: pip install --no-deps DIR/wheels/*.whl)"}
    pre = paper_pretrain(ctx.cpu, 1)
    cfg = write_experiment(ctx.work / "eager.yaml", pre, ctx.work)
    out = ctx.work / "eager.json"
    steps, warmup = (2, 1) if ctx.cpu else (5, 2)
    args = [sys.executable, ROOT / "bench" / "train_step_bench.py", "--config", cfg, "--example", ctx.train_step_bench,
            "--threads", str(os.cpu_count() if ctx.cpu else 1), "--steps", str(steps), "--warmup", str(warmup),
            "--size", str(pre["input_size"][0]), "--batch", str(pre["batch_size"]),
            "--device", "cpu" if ctx.cpu else "cuda", "--pytorch-malloc", "default", "--json", out]
    if not ctx.cpu:
        args.append("--bf16")
    run(args, timeout=ctx.timeout)
    rows = json.loads(out.read_text())
    r = rows[0]
    return {
        "device": r["med3d"]["device"],
        "bf16": r["med3d"]["bf16"],
        "batch": r["med3d"]["batch"],
        "side": r["med3d"]["side"],
        "med3d_median_ms": r["med3d"]["median_ms"],
        "pytorch_median_ms": r["pytorch"]["median_ms"],
        "ratio_med3d_over_pytorch": r["med3d"]["median_ms"] / r["pytorch"]["median_ms"],
        "parameters": [r["med3d"]["parameters"], r["pytorch"]["parameters"]],
        "peak_cuda_allocated_bytes": [r["med3d"].get("peak_cuda_allocated_bytes"),
                                      r["pytorch"].get("peak_cuda_allocated_bytes")],
    }


def section_ot(ctx):
    if ctx.ot_bench is None:
        return {"skipped": "ot_bench binary not found (build: cargo build --release --example ot_bench)"}
    import numpy as np

    d = ctx.work / "ot"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    cases = []
    for b in ([10, 32] if ctx.cpu else [10, 64, 256]):
        y = rng.normal(size=(b, 512))
        x = y + 0.3 * rng.normal(size=(b, 512))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
        a = rng.random((512, 512))
        w = np.diag(0.5 * (a + a.T) + np.eye(512))
        diff = x[:, None, :] - y[None, :, :]
        c = np.sqrt(np.maximum((diff * w[None, None, :] * diff).sum(-1), 1e-12))
        np.save(d / f"b{b}.npy", (c / c.max()).astype(np.float32))
        cases.append({"name": f"b{b}", "cost": f"b{b}.npy"})
    (d / "cases.json").write_text(json.dumps(cases))
    p, _ = run([ctx.ot_bench, d, "--device", "cpu" if ctx.cpu else "cuda", "--reps", "3",
                "--max-iter", "1000"], timeout=ctx.timeout)
    rows = [json.loads(l) for l in p.stdout.splitlines() if l.strip()]
    out = []
    for r in rows:
        n = r["name"]
        plan, fused = np.load(d / f"{n}.med3d.plan.npy"), np.load(d / f"{n}.fused.plan.npy")
        row = {**r, "plan_max_abs_diff_over_max": float(np.abs(plan - fused).max() / fused.max())}
        # which solver the measurement favours at this B (training_path is
        # align::Transport's size rule; the rule is right where they agree)
        row["faster_here"] = ("fused on the CPU" if r["fused_fwd_bwd_ms"] < r["fwd_bwd_ms"]
                              else "autograd on the device")
        g, gf = d / f"{n}.med3d.grad.npy", d / f"{n}.fused.grad.npy"
        if g.exists() and gf.exists():
            g, gf = np.load(g), np.load(gf)
            row["grad_max_abs_diff_over_max"] = float(np.abs(g - gf).max() / np.abs(gf).max())
        out.append(row)
    return {"cases": out}


def section_embed(ctx):
    if ctx.minilm is None:
        return {"skipped": "no MiniLM weights (data/models/all-MiniLM-L6-v2 or the bundle's minilm/)"}
    import numpy as np

    texts = ctx.work / "texts.json"
    texts.write_text(json.dumps([f"an axial slice {i} of a brain MRI with {w}" for i, w in
                                 enumerate(["grey matter", "ventricles", "a lesion", "the skull"] * 16)]))
    outs = {}
    for dev in (["cpu"] if ctx.cpu else ["cpu", "cuda"]):
        o = ctx.work / f"emb-{dev}.npy"
        run([ctx.bin, "encode", "--kind", "text", "--weights", ctx.minilm, "--input", texts, "--out", o,
             "--device", dev], timeout=ctx.timeout)
        outs[dev] = np.load(o)
    if ctx.cpu:
        # the same weights through libtorch twice: the CPU path must be deterministic
        o = ctx.work / "emb-cpu2.npy"
        run([ctx.bin, "encode", "--kind", "text", "--weights", ctx.minilm, "--input", texts, "--out", o,
             "--device", "cpu"], timeout=ctx.timeout)
        outs["cpu (again)"] = np.load(o)
    (a_name, a), (b_name, b) = list(outs.items())[:2]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"compared": [a_name, b_name], "rows": int(a.shape[0]), "dim": int(a.shape[1]),
            "max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}


def section_nccl(ctx):
    k = ctx.precision_steps
    pre = paper_pretrain(ctx.cpu, k)
    pre["precision"] = "fp32"
    _, single, _, _ = pretrain_once(ctx, "single", pre)
    backend = "gloo" if ctx.cpu else "nccl"
    env = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "MED3D_DIST_BACKEND": backend, "MED3D_DIST_TIMEOUT_S": "120"}
    out, dist, _, _ = pretrain_once(ctx, f"dist-{backend}", pre, env=env)
    a = [x["loss"] for x in metrics(ctx.work / "single")]
    b = [x["loss"] for x in metrics(out)]
    return {"backend": backend, "world_size": dist.get("world_size", 1), "single_loss": a, "dist_loss": b,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
            "allreduce_s": [x.get("allreduce_s") for x in metrics(out)]}


SECTIONS = [("doctor", section_doctor), ("pretrain", section_pretrain), ("precision", section_precision),
            ("eager", section_eager), ("ot", section_ot), ("embed", section_embed), ("nccl", section_nccl)]


# ---------------------------------------------------------------- bundle
def make_cache(med3d, cache):
    """The demo volumes preprocessed as the paper preset does (1.5 mm, 128^3),
    descriptor captions, MiniLM text embeddings: every step a med3d command."""
    work = Path(tempfile.mkdtemp(prefix="med3d-gpu-check-prep-"))
    exp = work / "exp.yaml"
    exp.write_text(
        f"name: gpu-check\nmanifest: {ROOT / 'data-manifests' / 'demo.yaml'}\nworkdir: {work}\n"
        "preprocess:\n  spacing: [1.5, 1.5, 1.5]\n  roi: [128, 128, 128]\n  roi_mode: crop_pad\n"
        "  ct_window: [-1000.0, 1000.0]\n  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n"
        "  slices_per_plane: 16\n  planes: [axial, coronal, sagittal]\n"
        "caption:\n  backend: descriptor\n  max_words: 60\n"
        f"embed:\n  text:\n    model: minilm\n    weights: {ROOT / 'data' / 'models' / 'all-MiniLM-L6-v2'}\n"
        "  batch_size: 64\n  device: cpu\n")
    for stage in (["preprocess", "--config", exp, "--out", cache], ["caption", "--config", exp, "--cache", cache],
                  ["embed", "--config", exp, "--cache", cache]):
        run([med3d, *stage], timeout=3600)
    shutil.rmtree(work)


def prepare(dest):
    """What the GPU machine needs, made here: stripped binaries, the cache,
    MiniLM in float16, MONAI's wheel."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    for name, src in [("med3d", target / "med3d"), ("ot_bench", target / "examples" / "ot_bench"),
                      ("train_step_bench", target / "examples" / "train_step_bench")]:
        if not src.exists():
            sys.exit(f"{src} is missing: make gpu-bundle builds it")
        shutil.copy2(src, dest / name)
        run(["strip", dest / name])
    make_cache(dest / "med3d", dest / "cache")
    # pretraining reads the volumes, the index and the embeddings; the slice
    # PNGs (captioned already) and the label maps stay behind, for the cap
    for case in (dest / "cache" / "cases").iterdir():
        shutil.rmtree(case / "slices", ignore_errors=True)
        (case / "label.npy").unlink(missing_ok=True)
    # MiniLM in float16 (half the bytes); the check compares device and CPU on these same weights.
    import torch
    from safetensors.torch import load_file, save_file

    src = ROOT / "data" / "models" / "all-MiniLM-L6-v2"
    mdst = dest / "minilm"
    mdst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.float16).contiguous() for k, v in load_file(str(f)).items()},
                      str(mdst / f.name))
        elif f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, mdst / f.name)
    wheels = dest / "wheels"
    wheels.mkdir(exist_ok=True)
    run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, "monai==1.6.1"])
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    # What travels to a device machine is capped at 64 MiB: the folder is
    # ~80 MiB, xz brings it to ~50 (the binaries shrink ~3x, the weights hardly).
    archive = dest.with_name(dest.name + ".tar.xz")
    run(["tar", "-cJf", archive, "-C", dest.parent, dest.name], timeout=1800)
    print(f"bundle {dest}: {size / 2**20:.1f} MiB; {archive}: {archive.stat().st_size / 2**20:.1f} MiB "
          f"(carry the archive; unpack with tar -xJf)")


# ---------------------------------------------------------------- main
class Ctx:
    pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run every section on the CPU, shapes shrunk")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--bundle", help="a folder made by --prepare (binaries, cache, minilm, wheels)")
    ap.add_argument("--bin", help="med3d binary (default: the bundle's, else target/release/med3d)")
    ap.add_argument("--cache", help="a cache with embeddings (default: the bundle's)")
    ap.add_argument("--steps", type=int, help="pretrain steps (default 30 on a GPU, 3 with --cpu)")
    ap.add_argument("--only", help="comma-separated sections to run")
    ap.add_argument("--prepare", metavar="DIR", help="make the bundle to carry to a GPU machine, then stop")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    bundle = Path(args.bundle) if args.bundle else None
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"

    def pick(*paths):
        return next((Path(p) for p in paths if p and Path(p).exists()), None)

    ctx = Ctx()
    ctx.cpu = args.cpu
    ctx.bin = pick(args.bin, bundle and bundle / "med3d", target / "med3d")
    if ctx.bin is None:
        sys.exit("no med3d binary: build it (make build) or pass --bin / --bundle")
    ctx.ot_bench = pick(bundle and bundle / "ot_bench", target / "examples" / "ot_bench")
    ctx.train_step_bench = pick(bundle and bundle / "train_step_bench", target / "examples" / "train_step_bench")
    ctx.minilm = pick(bundle and bundle / "minilm", ROOT / "data" / "models" / "all-MiniLM-L6-v2")
    ctx.steps = args.steps or (3 if args.cpu else 30)
    ctx.precision_steps = 2 if args.cpu else 5
    ctx.timeout = 600
    ctx.bf16_run = None
    tmp = tempfile.TemporaryDirectory(prefix="med3d-gpu-check-")
    ctx.work = Path(tmp.name)
    cache = pick(args.cache, bundle and bundle / "cache")
    if cache is None:
        print("no cache given: making one from the demo data (paper preprocessing)", file=sys.stderr)
        cache = ctx.work / "cache"
        make_cache(ctx.bin, cache)
    ctx.cache = cache
    only = set(args.only.split(",")) if args.only else None
    report = {"cpu": args.cpu, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": {}}
    failed = 0
    for name, f in SECTIONS:
        if only and name not in only:
            continue
        t = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        try:
            r = f(ctx)
            r = {"ok": "skipped" not in r, **r}
        except Exception as e:  # noqa: BLE001 - every section reports, none stops the rest
            r = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            failed += 1
        r["seconds"] = round(time.perf_counter() - t, 2)
        report["sections"][name] = r
        print(f"gpu_check: {name}: {'ok' if r['ok'] else r.get('skipped') or r.get('error')} ({r['seconds']} s)",
              file=sys.stderr, flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}
                      for k, v in report["sections"].items()}, indent=1))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
