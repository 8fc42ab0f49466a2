"""Where one case's preprocessing time goes, per stage, for each input
format: `med3d preprocess --workers 1` on one synthetic 512x512x300 CT
(the cases bench/preprocess_bench.py makes), its stage timings read from
med3d's own debug log (`MED3D_LOG=med3dinsight::preprocess=debug`: load,
orient, resample, intensity, crop, hash, write (the float16 volume),
slices (PNGs, index, case.json), commit (fsync and rename)), the median of --runs runs
per format, and beside them the floor of reading the input (inflating it,
for .nii.gz) in this process.

"load" is split into the readers' own steps (`read step` lines of the same
log, timed by `volume::source`): for NIfTI, "inflate" (.nii.gz, through
the process's inflater) or "read" (.nii), and "decode" (scaling and placing
each slab straight into C order, so decode and transpose are one pass);
for DICOM, "scan" (every file read once, headers parsed, bytes hashed),
"read" (each series file opened and parsed again for its pixel data),
"decode" and "transpose". What load leaves over is allocation and page
faults. "hash" is what remains of provenance hashing: nothing for a
source the reader hashed while reading it.

The floor is inflating the input with zlib and with ISA-L (Python's `isal`
package, the same igzip med3d loads) for .nii.gz, or reading the files for
.nii and DICOM. Runs med3d with MED3D_INFLATE unset (ISA-L where it
loads); --inflate zlib runs it on zlib-rs instead.

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
READ = re.compile(r'read step case="?([^" ]+)"? step="?([a-z]+)"? ms="?([0-9.]+)')


def one_case(fmt: str) -> dict:
    cases = [c for c in pb.ensure_data(1) if c["modality"] == "CT"]
    if fmt == "nii":
        cases = pb.plain_copies(cases)
    elif fmt == "dcm":
        cases = pb.dicom_series(cases)
    return cases[0]


def floor_s(case: dict, fmt: str, inflater: str = "zlib") -> float:
    t = time.perf_counter()
    if fmt == "nii.gz":
        opener = gzip.open
        if inflater == "isal":
            from isal import igzip
            opener = igzip.open
        with opener(case["image"], "rb") as f:
            while f.read(1 << 20):
                pass
    else:
        for p in pb.input_files(case["image"]):
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
    return time.perf_counter() - t


def run(binary: Path, case: dict, tag: str, inflate: str = "") -> dict:
    work = pb.WORK / "breakdown" / tag
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pb_cases = [case]
    manifest, exp = pb.write_configs(pb_cases)
    env = dict(os.environ, MED3D_LOG="med3dinsight::preprocess=debug", NO_COLOR="1")
    if inflate:
        env["MED3D_INFLATE"] = inflate
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
    for m in READ.finditer(p.stderr):
        k = "load." + m.group(2)
        steps[k] = steps.get(k, 0.0) + float(m.group(3)) / 1e3
    steps["wall"] = wall
    return steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--format", default="nii.gz,nii,dcm")
    ap.add_argument("--inflate", default="", help="MED3D_INFLATE for med3d (isal, zlib; default: ISA-L where it loads)")
    ap.add_argument("--bin", default=str(pb.ROOT / "target" / "release" / "med3d"))
    a = ap.parse_args()
    binary = Path(a.bin)
    doctor = json.loads(subprocess.run([str(binary), "doctor", "--json"], capture_output=True, text=True).stdout)
    inflater = a.inflate or doctor.get("gzip", {}).get("inflater", "zlib-rs")  # builds before 2026-12-07 evening: zlib-rs
    out = {}
    for fmt in a.format.split(","):
        case = one_case(fmt)
        runs = [run(binary, case, f"{fmt}-{i}", a.inflate) for i in range(a.runs)]
        keys = sorted({k for r in runs for k in r}, key=lambda k: (k == "wall", k))
        med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in keys}
        floors = {"floor": statistics.median(floor_s(case, fmt) for _ in range(a.runs))}
        if fmt == "nii.gz":
            floors["floor_isal"] = statistics.median(floor_s(case, fmt, "isal") for _ in range(a.runs))
        med.update(floors)
        out[fmt] = med
        staged = sum(v for k, v in med.items() if k not in ("wall",) and not k.startswith(("floor", "load.")))
        what = f" (med3d inflating with {inflater})" if fmt == "nii.gz" else ""
        print(f"{fmt}: one CT, median of {a.runs} runs, seconds{what}")
        for k in keys:
            if k == "wall" or k.startswith("load."):
                continue
            print(f"  {k:12s} {med[k]:7.3f}  ({100 * med[k] / staged:4.1f}% of the staged time)")
            if k == "load":
                parts = [p for p in keys if p.startswith("load.")]
                for p in parts:
                    print(f"    {p[5:]:10s} {med[p]:7.3f}")
                rest = med["load"] - sum(med[p] for p in parts)
                print(f"    {'other':10s} {rest:7.3f}  (allocation, first-touch page faults, headers)")
        print(f"  {'staged':12s} {staged:7.3f}; process wall {med['wall']:.3f} (start-up and the rest)")
        if fmt == "nii.gz":
            print(f"  floor        {med['floor']:7.3f}  zlib, {med['floor_isal']:.3f} ISA-L (inflating the input in Python)")
            fl = med["floor_isal"] if inflater == "isa-l" else med["floor"]
            print(f"  ratio load / floor ({inflater}): {med['load'] / fl:.2f}; inflate / floor: {med.get('load.inflate', 0.0) / fl:.2f}", flush=True)
        else:
            print(f"  floor        {med['floor']:7.3f}  (reading the input in Python)")
            print(f"  ratio load / floor: {med['load'] / med['floor']:.2f}", flush=True)
    (pb.WORK / "preprocess-breakdown.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
