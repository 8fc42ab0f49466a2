"""Where one case's preprocessing time goes, per stage, for each input
format: `med3d preprocess --workers 1` on one synthetic 512x512x300 CT
(the cases bench/preprocess_bench.py makes), its stage timings read from
med3d's own debug log (`MED3D_LOG=med3dinsight::preprocess=debug`: load,
orient, resample, intensity, crop, hash, write), the median of --runs runs
per format, and beside them the floor of reading the input (inflating it,
for .nii.gz) in this process.

"load" is read + inflate + decode + transpose together: med3d's reader
does them in one streaming pass and does not time them apart yet.

Usage:
  .venv/bin/python bench/preprocess_breakdown.py [--runs 3] [--format nii.gz,nii,dcm] [--bin target/release/med3d]
"""
import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import preprocess_bench as pb  # noqa: E402

STEP = re.compile(r'step done case="?([^" ]+)"? step="?([a-z]+)"? ms="?([0-9.]+)')


def one_case(fmt: str) -> dict:
    cases = [c for c in pb.ensure_data(1) if c["modality"] == "CT"]
    if fmt == "nii":
        cases = pb.plain_copies(cases)
    elif fmt == "dcm":
        cases = pb.dicom_series(cases)
    return cases[0]


def floor_s(case: dict, fmt: str) -> float:
    t = time.perf_counter()
    if fmt == "nii.gz":
        with gzip.open(case["image"], "rb") as f:
            while f.read(1 << 20):
                pass
    else:
        for p in pb.input_files(case["image"]):
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
    return time.perf_counter() - t


def run(binary: Path, case: dict, tag: str) -> dict:
    work = pb.WORK / "breakdown" / tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pb_cases = [case]
    manifest, exp = pb.write_configs(pb_cases)
    env = dict(os.environ, MED3D_LOG="med3dinsight::preprocess=debug", NO_COLOR="1")
    t = time.perf_counter()
    p = subprocess.run([str(binary), "preprocess", "--config", str(exp), "--out", str(work / "cache"),
                        "--workers", "1"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"med3d preprocess failed:\n{p.stderr[-2000:]}")
    steps = {}
    for m in STEP.finditer(p.stderr):
        steps[m.group(2)] = steps.get(m.group(2), 0.0) + float(m.group(3)) / 1e3
    if not steps:
        sys.exit("no step timings in med3d's log (is the debug filter right?)")
    steps["wall"] = wall
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", default="nii.gz,nii,dcm")
    ap.add_argument("--bin", default=str(pb.ROOT / "target" / "release" / "med3d"))
    a = ap.parse_args()
    binary = Path(a.bin)
    out = {}
    for fmt in a.format.split(","):
        case = one_case(fmt)
        runs = [run(binary, case, f"{fmt}-{i}") for i in range(a.runs)]
        floors = [floor_s(case, fmt) for _ in range(a.runs)]
        keys = sorted({k for r in runs for k in r}, key=lambda k: (k == "wall", k))
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        med["floor"] = statistics.median(floors)
        out[fmt] = med
        staged = sum(v for k, v in med.items() if k not in ("wall", "floor"))
        print(f"{fmt}: one CT, median of {a.runs} runs, seconds")
        for k in keys:
            if k != "wall":
                print(f"  {k:10s} {med[k]:7.3f}  ({100 * med[k] / staged:4.1f}% of the staged time)")
        print(f"  {'staged':10s} {staged:7.3f}; process wall {med['wall']:.3f} (start-up and the rest)")
        print(f"  floor      {med['floor']:7.3f}  ({'inflating' if fmt == 'nii.gz' else 'reading'} the input in Python)")
        print(f"  ratio load / floor: {med.get('load', 0.0) / med['floor']:.2f}", flush=True)
    (pb.WORK / "preprocess-breakdown.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
