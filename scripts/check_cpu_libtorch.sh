#!/usr/bin/env bash
# A libtorch without CUDA still builds med3d, and that med3d runs.
#
# PyPI's torch 2.11.0 for Linux x86_64 is a CUDA build; there is no CPU-only
# libtorch 2.11.0 on the registries this project reaches. So this makes one
# from the venv's torch the way a CPU-only libtorch is laid out: include/,
# and lib/ with libtorch_cpu, libc10, libgomp and a libtorch.so that needs
# only libtorch_cpu, and no libtorch_cuda / libc10_cuda. (libtorch_cpu of
# this wheel still needs cudart and cupti for its profiler, found beside it
# through its own run-path, as in the wheel.) It builds med3d against that
# folder (LIBTORCH, its own target folder, an unoptimised profile to keep
# the build short), then checks: no CUDA library NEEDED or loaded, doctor
# says so without crashing, and the MiniLM text embedding of three captions
# equals the one from the main build's binary bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MAIN_BIN=${MED3D_BIN:-target/release/med3d}
site=$($PY -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
work=${CPU_LIBTORCH_WORK:-target/cpu-libtorch}
root=$work/site/torch
rm -rf "$work/site"
mkdir -p "$root/lib"
ln -s "$site/torch/include" "$root/include"
# The wheel's libraries find cudart/cupti at $ORIGIN/../../nvidia/...
ln -s "$site/nvidia" "$work/site/nvidia"
for f in libtorch_cpu.so libc10.so libgomp.so.1 libshm.so; do
  ln -s "$site/torch/lib/$f" "$root/lib/$f"
done
echo 'void med3d_cpu_libtorch_shim(void) {}' > "$work/shim.c"
gcc -shared -fPIC -o "$root/lib/libtorch.so" "$work/shim.c" \
  -Wl,--no-as-needed -L"$root/lib" -ltorch_cpu -Wl,-rpath,'$ORIGIN'
test ! -e "$root/lib/libtorch_cuda.so"

root_abs=$(cd "$root" && pwd)
echo "building med3d against $root_abs (no libtorch_cuda)"
env -u LIBTORCH_USE_PYTORCH LIBTORCH="$root_abs" LIBTORCH_CXX11_ABI=1 CARGO_TARGET_DIR="$work/target" \
  cargo build --profile cpu-check --bin med3d
bin=$work/target/cpu-check/med3d

fail() { echo "check_cpu_libtorch: $*" >&2; exit 1; }
readelf -d "$bin" | grep -q 'libtorch_cuda' && fail "the CPU-only build needs libtorch_cuda"
readelf -d "$bin" | grep -q "RUNPATH.*$root_abs/lib" || fail "the run-path is not the CPU-only libtorch"
"$bin" doctor --json > "$work/doctor.json"
$PY - "$work/doctor.json" "$root_abs/lib" <<'PYEOF'
import json, os, sys
d = json.load(open(sys.argv[1]))
t = d["libtorch"]
assert t["cuda_library"] is None, t
assert t["cuda_available"] is False and t["cuda_device_count"] == 0, t
# maps names the file behind the symlink: the same libtorch_cpu.so
assert os.path.samefile(os.path.join(t["lib_dir"], "libtorch_cpu.so"), os.path.join(sys.argv[2], "libtorch_cpu.so")), t["lib_dir"]
assert t["version"] == "2.11.0", t
assert d["bridge"]["nccl"] is False, d["bridge"]
print("doctor:", "; ".join(d["mismatches"]) or "no mismatches")
PYEOF
echo '["an axial slice of a brain MRI", "a coronal CT slice of the chest", "lungs"]' > "$work/texts.json"
for b in "$bin" "$MAIN_BIN"; do
  tag=$(basename "$(dirname "$b")")
  "$b" encode --kind text --weights data/models/all-MiniLM-L6-v2 --input "$work/texts.json" \
    --out "$work/emb-$tag.npy" --device cpu --threads 1
done
cmp "$work/emb-cpu-check.npy" "$work/emb-release.npy" || fail "embeddings differ between the CPU-only and the CUDA-linked build"
echo "check_cpu_libtorch: ok (built against a libtorch without CUDA; runs; embeddings identical)"
