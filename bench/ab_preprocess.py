"""Two builds of med3d side by side on the preprocessing bench's volumes: a
change that must not cost speed (a bound check, a refactor) is measured
against the build before it, in one run, alternating A and B so that drift
on a noisy machine falls on both.

Needs the volumes `bench/preprocess_bench.py --format F` made under
work/bench/data/ (run it once per format first). Each run is
`med3d preprocess --workers 1` of the 4 volumes into a fresh cache; the
figure is the CPU time (user + system) of the whole process, from the
kernel (os.wait4), and its median over the runs.

Usage: python bench/ab_preprocess.py A_BIN B_BIN [--runs 5] [--format nii.gz,nii,dcm]
The last line printed is the ratio line (B / A, median CPU).
"""
import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "work" / "bench" / "data"


def volumes(fmt):
    if fmt == "nii.gz":
        cts = sorted(DATA.glob("ct*_512x512x300_v2.nii.gz"))
        mni = ROOT / "data" / "demo" / "mni152_t1.nii.gz"
    elif fmt == "nii":
        cts = sorted((DATA / "plain").glob("ct*.nii"))
        mni = next((DATA / "plain").glob("mni*.nii"), None)
    else:
        cts = sorted(p for p in (DATA / "dicom").glob("ct*") if p.is_dir())
        mni = DATA / "dicom" / "mni152_t1"
    vols = [(p.name.split("_")[0].split(".")[0], p, "CT") for p in cts]
    if mni is not None and mni.exists():
        vols.append(("mni152", mni, "MR"))
    return vols


def write_inputs(d: Path, fmt):
    vols = volumes(fmt)
    if len(vols) < 2:
        raise SystemExit(f"no bench volumes for {fmt} under {DATA}: run bench/preprocess_bench.py --format {fmt}")
    m = d / "manifest.yaml"
    m.write_text("name: ab\ncases:\n" + "".join(f"  - id: {i}\n    image: {p}\n    modality: {mod}\n" for i, p, mod in vols))
    cfg = d / "experiment.yaml"
    cfg.write_text(
        f"name: ab\nmanifest: {m}\nworkdir: {d / 'run'}\npreprocess:\n  spacing: [1.5, 1.5, 1.5]\n"
        "  roi: [128, 128, 128]\n  roi_mode: crop_pad\n  ct_window: [-1000.0, 1000.0]\n"
        "  mr_percentiles: [0.5, 99.5]\n  foreground_threshold: 0.0\n  slices_per_plane: 16\n"
        "  planes: [axial, coronal, sagittal]\n"
    )
    return cfg, len(vols)


def cpu_of(binary, cfg, out):
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.Popen([binary, "preprocess", "--config", cfg, "--out", out, "--workers", "1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{binary} failed: {p.stderr.read().decode()[-2000:]}")
    return ru.ru_utime + ru.ru_stime


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--format", default="nii.gz,nii,dcm")
    args = ap.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        for fmt in args.format.split(","):
            cfg, n = write_inputs(t, fmt)
            cpu = {"a": [], "b": []}
            for _ in range(args.runs):
                for side in ("a", "b"):
                    cpu[side].append(cpu_of(getattr(args, side), cfg, t / "out"))
            ma, mb = statistics.median(cpu["a"]), statistics.median(cpu["b"])
            spread = lambda v: f"{min(v):.2f}..{max(v):.2f}"  # noqa: E731
            print(f"{fmt:7s} {n} volumes, {args.runs} runs each: A {ma:.2f} s CPU ({spread(cpu['a'])}), "
                  f"B {mb:.2f} s ({spread(cpu['b'])}), B/A {mb / ma:.3f}")
            lines.append(f"{fmt} {mb / ma:.3f}")
    print("ratio B/A median CPU: " + ", ".join(lines))


if __name__ == "__main__":
    main()
