"""Caption client throughput: requests/s that `med3d caption` sustains
against a fast local OpenAI-compatible server (examples/caption_server.rs)
at 64 and 256 requests in flight, and the med3d process's CPU seconds per
request (user + system, from wait4's rusage).

Each run captions every slice of a cache into a fresh captions file, so
the wall time includes start-up, reading and hashing every PNG, base64,
JSON, HTTP, appending records under the lock and the final compaction.

usage: python bench/caption_bench.py [--cases 100] [--repeats 3] [--server-threads 1]
(`make bench` builds the binary and the example first.)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(os.environ.get("MED3D_BIN", ROOT / "target" / "release" / "med3d"))
SERVER = ROOT / "target" / "release" / "examples" / "caption_server"


def build_cache(d, cases):
    img = ROOT / "data" / "demo" / "nibabel_anatomical.nii"
    lines = ["name: bench", "cases:"]
    for i in range(cases):
        lines.append(f"  - {{id: c{i:04d}, image: {img}, modality: MR}}")
    (d / "m.yaml").write_text("\n".join(lines) + "\n")
    (d / "pre.yaml").write_text(
        f"name: bench\nmanifest: {d / 'm.yaml'}\nworkdir: {d / 'w'}\n"
        "preprocess:\n  spacing: [1.0, 1.0, 1.0]\n  roi: [64, 80, 48]\n  slices_per_plane: 48\n"
    )
    subprocess.run([str(BIN), "preprocess", "--config", d / "pre.yaml"], check=True, capture_output=True)
    cache = d / "w" / "cache"
    n = len((cache / "index.jsonl").read_text().splitlines())
    return cache, n


def run_once(cache, cfg, out, keep=False):
    if out.exists() and not keep:
        out.unlink()
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [str(BIN), "caption", "--cache", cache, "--config", cfg, "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    stdout = p.stdout.read().decode()
    stderr = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"caption failed:\n{stdout}\n{stderr}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-threads", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        cache, n = build_cache(d, a.cases)
        srv = subprocess.Popen([str(SERVER), "0", str(a.server_threads)], stdout=subprocess.PIPE, text=True)
        try:
            port = int(srv.stdout.readline().split()[1])
            print(f"caption client bench: {n} slices per run, fake server on 127.0.0.1:{port} "
                  f"({a.server_threads} thread), {os.cpu_count()} CPUs, best of {a.repeats}")
            print(f"{'in flight':>9} {'req/s':>8} {'wall s':>7} {'CPU ms/req':>10} {'CPU s':>6} {'max RSS MiB':>11}")
            for inflight in (64, 256):
                cfg = d / f"c{inflight}.yaml"
                cap = {"openai": {"base_url": f"http://127.0.0.1:{port}/v1", "model": "bench",
                                  "max_in_flight": inflight, "timeout_s": 30}}
                cfg.write_text(f"name: b\nmanifest: x\nworkdir: x\ncaption: {json.dumps(cap)}\n")
                runs = [run_once(cache, cfg, d / "out.jsonl") for _ in range(a.repeats)]
                wall, cpu, rss = min(runs)
                print(f"{inflight:>9} {n / wall:>8.0f} {wall:>7.2f} {1000 * cpu / n:>10.3f} {cpu:>6.2f} {rss:>11.1f}")
            # the same run again over the finished file: start-up, index,
            # hashing every PNG, the skip check and compaction, no requests
            wall, cpu, rss = min(run_once(cache, cfg, d / "out.jsonl", keep=True) for _ in range(a.repeats))
            print(f"rerun with every slice done (no requests): {wall:.2f} s wall, {cpu:.2f} CPU s, {rss:.1f} MiB")
        finally:
            srv.kill()


if __name__ == "__main__":
    main()
