"""Partial OT solver: med3d (examples/ot_bench.rs, tch) vs the POT library
(`ot.partial.entropic_partial_wasserstein`, numpy and torch backends), on
the same cost matrices, the same CPU threads, side by side in one run.

    .venv/bin/python bench/ot_bench.py [--sizes 10,64,256] [--threads 1,all] [--reps 5] [--dtype float32]

Costs are the method's (docs/method.md): normalised diagonal-Mahalanobis
distances between L2-normalised 512-d embeddings x_i and y_j, with each x_i
a noisy copy of its y_i, weights diag(0.5(A + A^T) + I), A ~ U[0, 1).
eps 0.03, m 0.95, uniform marginals, 1000 iterations on both sides.

Stopping rules: POT stops when ||K_prev - K||_F < stopThr, checked every 10
iterations, with stopThr = 1e-100 by default, so in practice it always runs
numItermax = 1000 iterations (it also checks K for NaN/Inf every iteration,
a device sync on torch). med3d's solver with tol = 0 (the training default)
runs exactly max_iter = 1000 iterations too; with tol > 0 it checks the
change of log K every 10 iterations. Both sides run 1000 iterations here.

Timed: forward (the plan, no autograd: POT numpy, POT torch under no_grad,
med3d without gradients) and forward + backward (loss = -sum_i log(pi_ii)
/ B, gradients through every iteration to the cost, as in training: POT
torch under autograd). med3d has two implementations, both timed: `fused`
(src/align/pot_fused.rs: plain-Rust float64 loops with a hand-written
reverse pass; what training uses on the CPU) and `tch` (ot.rs: libtorch
ops under libtorch's autograd; used on CUDA). Ratios are against `fused`.
Median of --reps runs after one warm-up run. Also checks that the plans
agree (max |diff| over max plan entry, each med3d plan vs POT numpy).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ot
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
EXAMPLE = TARGET / "release" / "examples" / "ot_bench"
EPS, MASS, ITERS, DIM = 0.03, 0.95, 1000, 512


def method_cost(b, seed):
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((b, DIM))
    x = y + 0.7 * rng.standard_normal((b, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    a = rng.random((DIM, DIM))
    w = np.diag(0.5 * (a + a.T) + np.eye(DIM))
    d2 = ((x[:, None, :] - y[None, :, :]) ** 2 * w).sum(-1)
    c = np.sqrt(np.maximum(d2, 1e-12))
    return c / c.max()


def timed(reps, f):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t) * 1e3)
    return float(np.median(ts))


def pot_side(cost, reps):
    b = cost.shape[0]
    a = np.full(b, 1.0 / b, dtype=cost.dtype)
    plan = ot.partial.entropic_partial_wasserstein(a, a, cost, reg=EPS, m=MASS, numItermax=ITERS)
    np_fwd = timed(reps, lambda: ot.partial.entropic_partial_wasserstein(a, a, cost, reg=EPS, m=MASS, numItermax=ITERS))
    ct = torch.from_numpy(cost)
    at = torch.from_numpy(a)

    def t_fwd():
        with torch.no_grad():
            ot.partial.entropic_partial_wasserstein(at, at, ct, reg=EPS, m=MASS, numItermax=ITERS)

    def t_fwd_bwd():
        c = ct.clone().requires_grad_(True)
        p = ot.partial.entropic_partial_wasserstein(at, at, c, reg=EPS, m=MASS, numItermax=ITERS)
        (-torch.log(torch.diagonal(p)).sum() / b).backward()
        return c.grad

    return plan, np_fwd, timed(reps, t_fwd), timed(reps, t_fwd_bwd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10,64,256")
    ap.add_argument("--threads", default="1,all")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    if not EXAMPLE.exists():
        sys.exit(f"{EXAMPLE} is missing: run `cargo build --release --example ot_bench` first")
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [os.cpu_count() if t == "all" else int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cases = []
        for b in sizes:
            np.save(d / f"b{b}.npy", method_cost(b, seed=b).astype(args.dtype))
            cases.append({"name": f"b{b}", "cost": f"b{b}.npy"})
        (d / "cases.json").write_text(json.dumps(cases))
        for n in threads:
            out = subprocess.run(
                [str(EXAMPLE), str(d), "--threads", str(n), "--reps", str(args.reps),
                 "--eps", str(EPS), "--mass", str(MASS), "--max-iter", str(ITERS)],
                check=True, capture_output=True, text=True,
            ).stdout
            ours = {r["name"]: r for r in map(json.loads, out.splitlines())}
            torch.set_num_threads(n)
            with threadpool_limits(n):
                for b in sizes:
                    cost = np.load(d / f"b{b}.npy")
                    plan, np_fwd, t_fwd, t_fwd_bwd = pot_side(cost, args.reps)
                    err = lambda f: float(np.abs(np.load(d / f) - plan).max() / np.abs(plan).max())
                    o = ours[f"b{b}"]
                    rows.append(dict(
                        threads=n, b=b, pot_np=np_fwd, pot_torch=t_fwd, pot_torch_bwd=t_fwd_bwd,
                        med3d=o["fused_fwd_ms"], med3d_bwd=o["fused_fwd_bwd_ms"],
                        tch=o["fwd_ms"], tch_bwd=o["fwd_bwd_ms"],
                        plan_err=max(err(f"b{b}.fused.plan.npy"), err(f"b{b}.med3d.plan.npy")),
                    ))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\npartial OT, eps {EPS}, m {MASS}, {ITERS} iterations, {args.dtype}, median of {args.reps} (ms)")
    head = ("thr", "B", "POT-np fwd", "POT-torch fwd", "med3d fwd (tch)", "POT-np/med3d", "POT-torch/med3d",
            "POT-torch f+b", "med3d f+b (tch)", "POT-torch/med3d f+b", "plan rel err")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join([
            str(r["threads"]), str(r["b"]),
            f"{r['pot_np']:.1f}", f"{r['pot_torch']:.1f}", f"{r['med3d']:.2f} ({r['tch']:.0f})",
            f"{r['pot_np'] / r['med3d']:.1f}x", f"{r['pot_torch'] / r['med3d']:.1f}x",
            f"{r['pot_torch_bwd']:.1f}", f"{r['med3d_bwd']:.2f} ({r['tch_bwd']:.0f})",
            f"{r['pot_torch_bwd'] / r['med3d_bwd']:.1f}x", f"{r['plan_err']:.1e}",
        ]) + " |")
    # the ratio line, last
    print("ratio POT-numpy / med3d forward, POT-torch / med3d forward+backward: " + "; ".join(
        f"threads {r['threads']} B {r['b']}: {r['pot_np'] / r['med3d']:.1f}x, {r['pot_torch_bwd'] / r['med3d_bwd']:.1f}x"
        for r in rows))


if __name__ == "__main__":
    main()
