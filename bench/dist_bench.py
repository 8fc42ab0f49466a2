"""Data-parallel pretraining throughput on this machine: 1 process against
2 ranks (Gloo over loopback) at the same global batch and the same total
CPU threads, and the share of the 2-rank step spent averaging gradients.

    .venv/bin/python bench/dist_bench.py [--steps 6] [--batch 4] [--threads 2] [--size 64]

Both runs train the demo's model (feature_size 12, depths 2/2/2/2, PSAT 2
layers, POT) on a synthetic cache of 64^3 volumes, `--steps` steps of
`--batch` volumes (1 process: batch B with T threads; 2 ranks: batch B/2
with T/2 threads each). The first step is a warm-up and is left out.
Reported per run: the median of the metrics lines' global volumes/s, and
for 2 ranks the median `allreduce_s` (rank 0's time in the bucketed
gradient all-reduce) and its share of the step time.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("MED3D_BIN", ROOT / "target" / "release" / "med3d"))
AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}


def write_cache(cache: Path, cases: int, size: int, dim: int = 32, per_plane: int = 4) -> None:
    """A cache as `med3d preprocess` + `embed` write it: float16 volumes,
    index.jsonl, embeddings/text.safetensors."""
    rng = np.random.default_rng(0)
    rows = []
    g = np.linspace(0, 1, size, dtype=np.float32)
    x, y, z = np.meshgrid(g, g, g, indexing="ij")
    for c in range(cases):
        cid = f"case{c}"
        d = cache / "cases" / cid
        d.mkdir(parents=True, exist_ok=True)
        blob = ((x - 0.4 - 0.02 * c) ** 2 + (y - 0.5) ** 2 + (z - 0.5) ** 2) < 0.06
        vol = np.where(blob, 0.6 + 0.02 * c, 0.1 * x) + 0.02 * rng.standard_normal(x.shape)
        np.save(d / "image.npy", np.clip(vol, 0, 1).astype(np.float16))
        for plane, axis in AXIS.items():
            for k in range(per_plane):
                idx = (k + 1) * (size - 1) // (per_plane + 1)
                rows.append(
                    {
                        "slice_id": f"{cid}/{plane}/{idx}",
                        "case": cid,
                        "plane": plane,
                        "index": idx,
                        "position": idx / (size - 1),
                        "png": f"cases/{cid}/slices/{plane}_{idx:03d}.png",
                    }
                )
    (cache / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = rng.standard_normal((len(rows), dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    (cache / "embeddings").mkdir(exist_ok=True)
    save_file(
        {"embeddings": emb, "valid": np.ones(len(rows), dtype=np.uint8)},
        str(cache / "embeddings" / "text.safetensors"),
    )


def config(path: Path, batch: int, threads: int, steps: int, size: int) -> Path:
    path.write_text(
        f"""name: bench
manifest: m.yaml
workdir: {path.parent / 'work'}
pretrain:
  run: {{device: cpu, threads: {threads}, workers: 1, checkpoint_every: 100000}}
  backbone: {{feature_size: 12, depths: [2, 2, 2, 2], num_heads: [3, 6, 12, 24], fused_attention: true}}
  psat: {{layers: 2, heads: 4, queries: 16, bins: 32, dropout: 0.1}}
  align: {{loss: pot, max_iter: 1000}}
  optimizer: {{lr: 1.0e-4}}
  batch_size: {batch}
  max_steps: {steps}
  sampling: slice
  input_size: [{size}, {size}, {size}]
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cfg: Path, cache: Path, out: Path, world: int) -> list:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_NTASKS")}
    port = str(free_port())
    procs = []
    for r in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [str(BIN), "pretrain", "--config", str(cfg), "--cache", str(cache), "--out", str(out)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for r, p in enumerate(procs):
        text, _ = p.communicate()
        if p.returncode != 0:
            sys.exit(f"rank {r} failed:\n{text}")
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="global batch (each of 2 ranks takes half)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads in all (each of 2 ranks takes half)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cases", type=int, default=8)
    a = ap.parse_args()
    if a.batch % 2 or a.batch < 4 or a.threads % 2:
        sys.exit("--batch must be even and >= 4, --threads even")
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        cache = d / "cache"
        write_cache(cache, a.cases, a.size)
        results = {}
        for world in (1, 2):
            cfg = config(d / f"exp{world}.yaml", a.batch // world, a.threads // world, a.steps, a.size)
            t = time.perf_counter()
            m = run(cfg, cache, d / f"run{world}", world)[1:]
            wall = time.perf_counter() - t
            vps = statistics.median(x["volumes_per_s"] for x in m)
            r = {"ranks": world, "batch_per_rank": a.batch // world, "threads_per_rank": a.threads // world,
                 "volumes_per_s": round(vps, 4), "step_s": round(a.batch / vps, 3), "wall_s": round(wall, 1)}
            if world > 1:
                ar = statistics.median(x["allreduce_s"] for x in m)
                r["allreduce_s"] = round(ar, 4)
                r["allreduce_share"] = round(ar / (a.batch / vps), 4)
            results[world] = r
            print(json.dumps(r), flush=True)
        print(
            f"2 ranks / 1 process throughput: {results[2]['volumes_per_s'] / results[1]['volumes_per_s']:.2f}x; "
            f"allreduce {100 * results[2]['allreduce_share']:.1f}% of a 2-rank step"
        )


if __name__ == "__main__":
    main()
