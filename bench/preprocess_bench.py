"""Preprocessing benchmark: med3d against MONAI on the same volumes.

Both sides do the same chain per volume: load the NIfTI, reorient to RAS,
resample to 1.5 mm (trilinear), map intensities to [0, 1] (CT: window
[-1000, 1000] HU; MR: percentiles 0.5/99.5), crop to the foreground, pad /
centre-crop to 128^3, and save float16. med3d also hashes each source file
and writes 48 PNG slices, an index and provenance per case; the MONAI side
only calls np.save, so the comparison leans in MONAI's favour.

Volumes: a few synthetic CTs (512x512x300 int16 .nii.gz, ~0.7x0.7x1 mm, LPS
affine so reorientation flips two axes), generated once and cached under
work/bench/data/, plus the MNI152 T1 from data/demo/ (MR).

Configurations, each in its own fresh subprocess (so its peak memory is its
own): med3d `--workers 1` and `--workers <ncores>`; MONAI sequential with
one torch thread, and a multiprocessing pool of <ncores> processes with one
torch thread each.

Times: med3d is the wall clock and CPU time (user + system) of the whole
`med3d preprocess` process (start-up, hashing, slices and index included);
MONAI is the wall clock and CPU time (its own and its pool workers') of the
processing loop inside its process (Python and torch/MONAI import time
excluded). Two ratios are printed: throughput (volumes per wall-clock
second) and CPU efficiency (MONAI CPU seconds / med3d CPU seconds, the
per-core ratio, which a busy machine disturbs far less than wall clock; the
load average is recorded alongside). The floor: the CPU time of only
inflating the same inputs in one process (zlib through Python, and `gzip
-dc`), and each side's CPU time over it. Memory: "peak RSS" is the peak
resident set of the largest single process (exact, from the kernel, taken
by /usr/bin/time when present); "peak PSS" is the summed proportional set
size of the whole process tree, sampled every 50 ms (what a pool of workers
really occupies, shared pages counted once).

Usage: python bench/preprocess_bench.py [--ct 3] [--workers N] [--repeat 1]
       [--only med3d|monai] [--format nii.gz|nii|dcm]
--format nii runs the same volumes uncompressed (plain copies made once
under work/bench/data/plain/); the floor is then only reading the files.
--format dcm runs them as DICOM series, one uncompressed int16 file per
axial slice (written once under work/bench/data/dicom/<source stem>/ by
tests/python/dicom_synth.py: the same voxels and patient-space affine as
the NIfTI; CT stored as HU + 1024 with RescaleIntercept -1024, MR with
slope 1, intercept 0). med3d's manifest names the series folder; MONAI
reads it with LoadImaged(reader="PydicomReader"). The floor is only
reading every file of each series.
The last line printed is the ratio line.
Writes work/bench/preprocess.json (preprocess-<format>.json for the other
formats). Nothing here asserts on timings.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "work" / "bench"
DATA = WORK / "data"
MNI = ROOT / "data" / "demo" / "mni152_t1.nii.gz"

SPACING = (1.5, 1.5, 1.5)
ROI = (128, 128, 128)
CT_WINDOW = (-1000.0, 1000.0)
MR_PERCENTILES = (0.5, 99.5)
SLICES_PER_PLANE = 16

CT_SHAPE = (512, 512, 300)
CT_VERSION = 2  # bump when synthetic_ct changes, so cached files are remade
# Per synthetic CT: in-plane and through-plane spacing (mm).
CT_SPACINGS = [(0.70, 1.0), (0.68, 1.0), (0.75, 1.25), (0.72, 1.0), (0.66, 1.0), (0.78, 1.25)]

SINGLE_THREAD_ENV = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


# ---------------------------------------------------------------- data

def synthetic_ct(seed: int, inplane: float, dz: float):
    """A body-like int16 CT in HU: air outside an elliptic cylinder whose
    size varies along z; a fat layer under the skin, soft tissue inside,
    a vertebra-like bone ring, two lungs in the upper half; noise everywhere
    (in air folded below -1000 HU, so air stays background for the
    foreground crop, and the file compresses like a real scan rather than
    like a constant). Returns (array, affine)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nx, ny, nz = CT_SHAPE
    x = (np.arange(nx, dtype=np.float32) - nx / 2 + 0.5)[:, None]
    y = (np.arange(ny, dtype=np.float32) - ny / 2 + 0.5)[None, :]
    vol = np.empty(CT_SHAPE, np.int16)
    a0, b0 = 200.0 + 10 * rng.standard_normal(), 140.0 + 8 * rng.standard_normal()
    for k in range(nz):
        t = k / (nz - 1)
        s = 0.9 + 0.1 * np.sin(np.pi * t)  # body narrower at both ends
        a, b = a0 * s, b0 * s
        r = (x / a) ** 2 + (y / b) ** 2
        sl = -1000.0 - np.abs(rng.normal(0.0, 20.0, size=(nx, ny)).astype(np.float32))
        body = r <= 1.0
        sl[body] = -100.0  # fat
        inner = (x / (a - 18)) ** 2 + (y / (b - 18)) ** 2 <= 1.0
        sl[inner] = 40.0  # soft tissue
        if t > 0.55:  # lungs
            for cx in (-0.45 * a, 0.45 * a):
                lung = ((x - cx) / (0.3 * a)) ** 2 + ((y + 0.1 * b) / (0.55 * b)) ** 2 <= 1.0
                sl[lung] = -850.0
        # vertebra: bone ring behind the centre (posterior is +y in LPS voxel order)
        d = np.sqrt(x**2 + (y - 0.55 * b) ** 2)
        sl[(d >= 14) & (d <= 24)] = 700.0
        sl[body] += rng.normal(0.0, 20.0, size=int(body.sum())).astype(np.float32)
        vol[:, :, k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
    # LPS-like: i runs to the patient's left, j posterior, k superior.
    affine = np.diag([-inplane, -inplane, dz, 1.0])
    affine[:3, 3] = [inplane * (nx - 1) / 2, inplane * (ny - 1) / 2, -dz * (nz - 1) / 2]
    return vol, affine


def plain_copies(cases: list) -> list:
    """The same cases as uncompressed .nii files (made once, by inflating)."""
    import gzip

    plain = DATA / "plain"
    plain.mkdir(parents=True, exist_ok=True)
    out = []
    for c in cases:
        src = Path(c["image"])
        dst = plain / src.name.removesuffix(".gz")
        if not dst.exists():
            tmp = dst.with_suffix(".tmp")
            with gzip.open(src, "rb") as f, open(tmp, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 24)
            tmp.rename(dst)
        out.append({**c, "image": str(dst)})
    return out


# Stored value = voxel * slope + intercept recovers the NIfTI's voxels exactly.
DICOM_RESCALE = {"CT": (1.0, -1024.0), "MR": (1.0, 0.0)}


def dicom_series(cases: list) -> list:
    """The same cases as DICOM series folders (written once from the NIfTI,
    one file per slice along voxel axis 2, named in order and not nested:
    MONAI's PydicomReader only globs the folder's top level)."""
    import nibabel as nib
    import numpy as np

    sys.path.insert(0, str(ROOT / "tests" / "python"))
    import dicom_synth

    top = DATA / "dicom"
    top.mkdir(parents=True, exist_ok=True)
    out = []
    for c in cases:
        src = Path(c["image"])
        dst = top / src.name.removesuffix(".gz").removesuffix(".nii")
        if not dst.exists():
            t = time.perf_counter()
            img = nib.load(src)
            vol = np.asarray(img.dataobj)
            tmp = dst.with_name(dst.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            r = DICOM_RESCALE[c["modality"]]
            dicom_synth.write_series(vol, img.affine, tmp, rescale=lambda k, r=r: r, shuffle=False,
                                     modality=c["modality"])
            tmp.rename(dst)
            print(f"wrote {dst.relative_to(ROOT)}/ ({vol.shape[2]} slices, {input_bytes(dst) / 1e6:.0f} MB) "
                  f"in {time.perf_counter() - t:.1f} s", flush=True)
        out.append({**c, "image": str(dst)})
    return out


def input_files(path) -> list:
    """A case's input files: the file itself, or every file under a series folder."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file())


def input_bytes(path) -> int:
    return sum(f.stat().st_size for f in input_files(path))


def ensure_data(n_ct: int) -> list:
    """The cases, generating the synthetic CTs that are missing."""
    import nibabel as nib

    if not MNI.exists():
        sys.exit(f"{MNI} is missing: run `make setup` first")
    DATA.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n_ct):
        inplane, dz = CT_SPACINGS[i % len(CT_SPACINGS)]
        p = DATA / f"ct{i:02d}_{CT_SHAPE[0]}x{CT_SHAPE[1]}x{CT_SHAPE[2]}_v{CT_VERSION}.nii.gz"
        if not p.exists():
            t = time.perf_counter()
            vol, affine = synthetic_ct(1000 + i, inplane, dz)
            img = nib.Nifti1Image(vol, affine)
            img.set_data_dtype("int16")
            img.header.set_xyzt_units("mm")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            tmp = p.with_name(p.name[: -len(".nii.gz")] + ".tmp.nii.gz")
            nib.save(img, tmp)
            tmp.rename(p)
            print(f"generated {p.relative_to(ROOT)} ({p.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.1f} s", flush=True)
        cases.append({"id": p.name.split("_")[0], "image": str(p), "modality": "CT"})
    cases.append({"id": "mni152", "image": str(MNI), "modality": "MR"})
    return cases


def write_configs(cases: list) -> tuple:
    manifest = WORK / "manifest.yaml"
    lines = ["name: preprocess-bench", "cases:"]
    for c in cases:
        lines += [f"  - id: {c['id']}", f"    image: {c['image']}", f"    modality: {c['modality']}"]
    manifest.write_text("\n".join(lines) + "\n")
    exp = WORK / "experiment.yaml"
    exp.write_text(
        "name: preprocess-bench\n"
        f"manifest: {manifest}\n"
        f"workdir: {WORK / 'run'}\n"
        "preprocess:\n"
        f"  spacing: [{SPACING[0]}, {SPACING[1]}, {SPACING[2]}]\n"
        f"  roi: [{ROI[0]}, {ROI[1]}, {ROI[2]}]\n"
        "  roi_mode: crop_pad\n"
        f"  ct_window: [{CT_WINDOW[0]}, {CT_WINDOW[1]}]\n"
        f"  mr_percentiles: [{MR_PERCENTILES[0]}, {MR_PERCENTILES[1]}]\n"
        "  foreground_threshold: 0.0\n"
        f"  slices_per_plane: {SLICES_PER_PLANE}\n"
        "  planes: [axial, coronal, sagittal]\n"
    )
    return manifest, exp


# ---------------------------------------------------------------- MONAI side

def monai_transform(modality: str, dicom: bool):
    from monai.transforms import (
        Compose, CropForegroundd, EnsureChannelFirstd, LoadImaged, Orientationd,
        ResizeWithPadOrCropd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd, Spacingd,
    )

    k = "image"
    # a folder is a series; PydicomReader's default affine_lps_to_ras=True
    # gives the RAS affine the NIfTI reader gives
    reader = "PydicomReader" if dicom else None
    if modality == "CT":
        scale = ScaleIntensityRanged(k, a_min=CT_WINDOW[0], a_max=CT_WINDOW[1], b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentilesd(k, lower=MR_PERCENTILES[0], upper=MR_PERCENTILES[1], b_min=0.0, b_max=1.0, clip=True)
    return Compose([
        LoadImaged(k, reader=reader, image_only=True),
        EnsureChannelFirstd(k),
        Orientationd(k, axcodes="RAS"),
        Spacingd(k, pixdim=SPACING, mode="bilinear"),
        scale,
        CropForegroundd(k, source_key=k, allow_smaller=True),
        ResizeWithPadOrCropd(k, spatial_size=ROI),
    ])


def _monai_init():
    import torch

    torch.set_num_threads(1)


def monai_one(args: tuple) -> str:
    import numpy as np

    case, out = args
    d = monai_transform(case["modality"], Path(case["image"]).is_dir())({"image": case["image"]})
    arr = np.asarray(d["image"].detach().cpu().numpy()[0], dtype=np.float16)
    p = Path(out) / f"{case['id']}.npy"
    tmp = p.with_name(p.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, p)
    return case["id"]


def monai_child(cases_json: str, out: str, workers: int) -> None:
    """Runs inside a fresh process: imports, then times the processing loop."""
    import multiprocessing as mp
    import resource

    import monai  # noqa: F401  (imported before timing, and before forking)
    import torch

    torch.set_num_threads(1)
    cases = json.loads(Path(cases_json).read_text())
    Path(out).mkdir(parents=True, exist_ok=True)
    jobs = [(c, out) for c in cases]
    def children_cpu():
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    t, c, cc = time.perf_counter(), time.process_time(), children_cpu()
    if workers == 1:
        for j in jobs:
            monai_one(j)
    else:
        pool = mp.get_context("fork").Pool(workers, initializer=_monai_init)
        list(pool.imap_unordered(monai_one, jobs, chunksize=1))
        pool.close()
        pool.join()  # reaps the workers, so their CPU time is counted below
    wall = time.perf_counter() - t
    cpu = time.process_time() - c + children_cpu() - cc
    print(json.dumps({"loop_s": wall, "loop_cpu_s": cpu}), flush=True)


# ---------------------------------------------------------------- measuring

def _tree(pid: int) -> list:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


TIME = Path("/usr/bin/time")


def measure(cmd: list, env: dict) -> dict:
    """Runs cmd, returning wall seconds, CPU seconds, peak RSS of the largest
    process (ru_maxrss) and peak summed PSS of the process tree (sampled).
    The kernel keeps a process's RSS high-water mark across exec, so a child
    forked from this (large) Python would report at least our own RSS: when
    /usr/bin/time is there, the command runs under it (a small process) and
    its %M is the peak RSS."""
    peak_pss = [0]
    rss_file = WORK / ".maxrss"
    rss_file.unlink(missing_ok=True)
    if TIME.exists():
        cmd = [str(TIME), "-f", "%M", "-o", str(rss_file), *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak_pss[0] = max(peak_pss[0], sum(_pss_kb(p) for p in _tree(proc.pid)))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    # read the pipes in threads so a chatty child cannot block on them
    outs = {}
    readers = [threading.Thread(target=lambda n=n, s=s: outs.__setitem__(n, s.read())) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    for r in readers:
        r.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{outs.get('out', '')}\n{outs.get('err', '')}")
    maxrss_kb = ru.ru_maxrss
    if rss_file.exists():
        maxrss_kb = int(rss_file.read_text().split()[-1])
        rss_file.unlink()
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": maxrss_kb / 1024,
        "peak_pss_mb": peak_pss[0] / 1024,
        "stdout": outs.get("out", ""),
    }


def run_med3d(binary: Path, exp: Path, workers: int, tag: str) -> dict:
    cache = WORK / "out" / tag
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ)
    m = measure([str(binary), "preprocess", "--config", str(exp), "--out", str(cache), "--workers", str(workers)], env)
    report = json.loads((cache / "preprocess-report.json").read_text())
    if report["done"] != report["total"] or report["failed"]:
        sys.exit(f"med3d did not process every case: {report}")
    m["seconds"] = m["wall_s"]
    m["out"] = str(cache)
    return m


def run_monai(cases_json: Path, workers: int, tag: str) -> dict:
    out = WORK / "out" / tag
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, **SINGLE_THREAD_ENV, PYTHONWARNINGS="ignore")
    m = measure([sys.executable, str(Path(__file__).resolve()), "--monai-child", str(cases_json), str(out), str(workers)], env)
    loop = json.loads(m["stdout"].strip().splitlines()[-1])
    m["process_wall_s"], m["process_cpu_s"] = m["wall_s"], m["cpu_s"]
    m["seconds"], m["cpu_s"] = loop["loop_s"], loop["loop_cpu_s"]
    m["out"] = str(out)
    return m


def parity(cases: list, med3d_out: str, monai_out: str) -> dict:
    """Per case: shapes and the largest absolute difference of the stored
    float16 volumes (informational; MONAI's grid_sample and our separable
    trilinear differ by float rounding, and both by at most a voxel of crop
    at the foreground edge)."""
    import numpy as np

    res = {}
    for c in cases:
        a = np.load(Path(med3d_out) / "cases" / c["id"] / "image.npy").astype(np.float32)
        b = np.load(Path(monai_out) / f"{c['id']}.npy").astype(np.float32)
        res[c["id"]] = {
            "shape_med3d": list(a.shape),
            "shape_monai": list(b.shape),
            "max_abs_diff": float(np.abs(a - b).max()) if a.shape == b.shape else None,
            "mean_abs_diff": float(np.abs(a - b).mean()) if a.shape == b.shape else None,
        }
    return res


FLOOR_CHILD = r"""
import os, sys, time, zlib
if os.environ.get("FLOOR_INFLATER") == "isal":
    from isal import isal_zlib as zlib  # the same decompressobj API, ISA-L's igzip
t0, c0 = time.perf_counter(), time.process_time()
n = 0
paths = []
for arg in sys.argv[1:]:  # a folder (a DICOM series) stands for every file under it
    if os.path.isdir(arg):
        paths += sorted(os.path.join(d, f) for d, _, fs in os.walk(arg) for f in fs)
    else:
        paths.append(arg)
for path in paths:
    data = open(path, "rb").read()
    if not path.endswith(".gz"):
        n += len(data)
        continue
    pos = 0
    while pos < len(data):  # every member, as a multi-member reader does
        d = zlib.decompressobj(31)
        view = memoryview(data)[pos:]
        i = 0
        while not d.eof and i < len(view):
            n += len(d.decompress(view[i:i + (1 << 20)]))
            i += 1 << 20
        if not d.eof:
            break
        pos += len(view) - len(d.unused_data)

print(time.perf_counter() - t0, time.process_time() - c0, n)
"""


def floor(cases: list) -> dict:
    """The physical floor of reading the inputs: only inflating them (only
    reading, for plain files and DICOM series folders), one process, one core. Three inflaters: zlib
    and ISA-L (C, through Python's zlib and isal.isal_zlib, streamed in 1 MiB chunks) and
    `gzip -dc > /dev/null`. The lowest CPU time (ISA-L's) is the floor."""
    paths = [c["image"] for c in cases]
    out = {}
    p = subprocess.run([sys.executable, "-c", FLOOR_CHILD, *paths], capture_output=True, text=True, check=True)
    wall, cpu, n = p.stdout.split()
    # zlib inflating, or for plain files only reading them
    kind = "zlib" if any(p.endswith(".gz") for p in paths) else "read"
    out[kind] = {"wall_s": float(wall), "cpu_s": float(cpu), "bytes": int(n)}
    if kind == "zlib":
        # ISA-L, the inflater med3d uses where libisal.so.2 loads
        env = dict(os.environ, FLOOR_INFLATER="isal")
        p = subprocess.run([sys.executable, "-c", FLOOR_CHILD, *paths], capture_output=True, text=True, check=True, env=env)
        wall, cpu, n2 = p.stdout.split()
        assert int(n2) == int(n), "ISA-L and zlib inflate to different sizes"
        out["isal"] = {"wall_s": float(wall), "cpu_s": float(cpu), "bytes": int(n2)}
    if shutil.which("gzip") and kind == "zlib":
        t0 = time.perf_counter()
        r0 = os.times()
        for path in paths:
            if path.endswith(".gz"):
                subprocess.run(["gzip", "-dc", path], stdout=subprocess.DEVNULL, check=True)
        r1 = os.times()
        out["gzip"] = {"wall_s": time.perf_counter() - t0, "cpu_s": (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)}
    out["floor_cpu_s"] = min(v["cpu_s"] for v in out.values() if isinstance(v, dict))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ct", type=int, default=3, help="synthetic CT volumes (default 3)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the 'all cores' worker count (default: cpu count)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is reported")
    ap.add_argument("--only", choices=["med3d", "monai"], help="run one side only (for profiling)")
    ap.add_argument("--format", choices=["nii.gz", "nii", "dcm"], default="nii.gz",
                    help="the inputs gzipped (as generated), plain, or as DICOM series")
    ap.add_argument("--monai-child", nargs=3, metavar=("CASES_JSON", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.monai_child:
        monai_child(a.monai_child[0], a.monai_child[1], int(a.monai_child[2]))
        return

    binary = Path(os.environ.get("MED3D_BIN", ROOT / "target" / "release" / "med3d"))
    if not binary.exists():
        sys.exit(f"{binary} is missing: run `cargo build --release` (or `make build`) first")
    cases = ensure_data(a.ct)
    if a.format == "nii":
        cases = plain_copies(cases)
    elif a.format == "dcm":
        cases = dicom_series(cases)
    _, exp = write_configs(cases)
    cases_json = WORK / "cases.json"
    cases_json.write_text(json.dumps(cases))
    for c in cases:  # warm the page cache, so neither side pays the first read
        for path in input_files(c["image"]):
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    n = len(cases)
    load0 = os.getloadavg()
    if load0[0] > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load0[0]:.1f} on {os.cpu_count()} CPUs: other work is running, wall-clock numbers will be noisy")
    mb = sum(input_bytes(c["image"]) for c in cases) / 1e6
    print(f"{n} volumes ({a.ct} CT {'x'.join(map(str, CT_SHAPE))} int16 + MNI152 T1), {mb:.0f} MB as {'DICOM series' if a.format == 'dcm' else '.' + a.format}; "
          f"all cores = {a.workers} workers", flush=True)

    startup = None
    if a.only != "monai":
        # What every med3d process pays before any work (loading libtorch's
        # shared libraries and running their static initialisers).
        startup = min((measure([str(binary), "--version"], dict(os.environ)) for _ in range(3)), key=lambda m: m["cpu_s"])
        startup.pop("stdout", None)
        print(f"med3d start-up alone (`med3d --version`): {startup['wall_s']:.2f} s wall, {startup['cpu_s']:.2f} s CPU, "
              f"{startup['peak_rss_mb']:.0f} MB RSS (included in the med3d rows below)", flush=True)

    configs = []
    if a.only != "monai":
        configs += [("med3d", 1), ("med3d", a.workers)]
    if a.only != "med3d":
        configs += [("monai", 1), ("monai", a.workers)]
    results = {}
    for tool, w in configs:
        tag = f"{tool}-w{w}"
        best = None
        for _ in range(a.repeat):
            m = run_med3d(binary, exp, w, tag) if tool == "med3d" else run_monai(cases_json, w, tag)
            if best is None or m["seconds"] < best["seconds"]:
                best = m
        best.pop("stdout", None)
        best.update(tool=tool, workers=w, volumes=n, volumes_per_s=n / best["seconds"], loadavg_after=os.getloadavg())
        results[tag] = best
        print(f"  {tag:<10} {best['seconds']:7.2f} s  {best['volumes_per_s']:6.3f} vol/s  "
              f"rss {best['peak_rss_mb']:6.0f} MB  pss {best['peak_pss_mb']:6.0f} MB", flush=True)

    print()
    print(f"{'config':<12}{'seconds':>9}{'cpu s':>9}{'vol/s':>9}{'peak RSS MB':>13}{'peak PSS MB':>13}")
    for tag, m in results.items():
        print(f"{tag:<12}{m['seconds']:9.2f}{m['cpu_s']:9.2f}{m['volumes_per_s']:9.3f}{m['peak_rss_mb']:13.0f}{m['peak_pss_mb']:13.0f}")
    ratios = {}
    for w, label in ((1, "1 worker"), (a.workers, f"{a.workers} workers")):
        k1, k2 = f"med3d-w{w}", f"monai-w{w}"
        if k1 in results and k2 in results:
            r = results[k1]["volumes_per_s"] / results[k2]["volumes_per_s"]
            c = results[k2]["cpu_s"] / results[k1]["cpu_s"]
            ratios[f"w{w}"] = {"throughput": r, "cpu": c}
            print(f"med3d / MONAI, {label}: throughput {r:.1f}x, CPU efficiency {c:.1f}x")
    fl = floor(cases)
    what = "reading" if "read" in fl else "inflating"
    print(f"floor, only {what} the same inputs (one process): "
          + ", ".join(f"{k} {v['cpu_s']:.2f} s CPU" for k, v in fl.items() if isinstance(v, dict)))
    for tag in ("med3d-w1", "monai-w1"):
        if tag in results:
            r = results[tag]["cpu_s"] / fl["floor_cpu_s"]
            ratios.setdefault("floor", {})[tag] = r
            print(f"{tag} CPU / floor: {r:.2f}x" + (" (start-up included)" if tag.startswith("med3d") else ""))
    if "med3d-w1" in results and startup:
        # per-volume work only: what a run of many cases converges to
        r = (results["med3d-w1"]["cpu_s"] - startup["cpu_s"]) / fl["floor_cpu_s"]
        ratios.setdefault("floor", {})["med3d-w1-after-startup"] = r
        print(f"med3d-w1 CPU after start-up / floor: {r:.2f}x")
    par = None
    if "med3d-w1" in results and "monai-w1" in results:
        par = parity(cases, results["med3d-w1"]["out"], results["monai-w1"]["out"])
        print("output parity (med3d vs MONAI, float16 volumes):")
        for cid, p in par.items():
            if p["max_abs_diff"] is None:
                print(f"  {cid}: shapes differ {p['shape_med3d']} vs {p['shape_monai']}")
            else:
                print(f"  {cid}: max |diff| {p['max_abs_diff']:.4g}, mean |diff| {p['mean_abs_diff']:.3g}")

    out = {
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "loadavg_before": load0, "loadavg_after": os.getloadavg()},
        "binary": str(binary),
        "cases": cases,
        "config": {"spacing": SPACING, "roi": ROI, "ct_window": CT_WINDOW, "mr_percentiles": MR_PERCENTILES,
                   "slices_per_plane": SLICES_PER_PLANE},
        "timing": "med3d: whole process (wall, CPU); MONAI: processing loop (wall, CPU incl. pool workers; imports excluded)",
        "med3d_startup": startup,
        "results": results,
        "ratio_med3d_over_monai": ratios,
        "parity": par,
        "floor": fl,
    }
    name = "preprocess.json" if a.format == "nii.gz" else f"preprocess-{a.format}.json"
    (WORK / name).write_text(json.dumps(out, indent=2))
    print(f"wrote {(WORK / name).relative_to(ROOT)}")
    # the ratio line, last
    parts = [f"{k}: throughput {v['throughput']:.1f}x, CPU {v['cpu']:.1f}x" for k, v in ratios.items() if k != "floor"]
    parts += [f"{k} / floor {v:.2f}x" for k, v in ratios.get("floor", {}).items()]
    print(f"ratio (.{a.format}) med3d vs MONAI " + "; ".join(parts))


if __name__ == "__main__":
    main()
