#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECS seconds each (default 240;
# TARGETS to pick some) and prints each one's execution count, peak RSS and
# findings. Needs the nightly toolchain and cargo-fuzz (`cargo install
# cargo-fuzz`). Every target runs under a 2 GB RSS limit, a 2 GB limit on
# any single allocation, and an address-space limit (`ulimit -v`, AS_LIMIT_KB,
# default 4000000): libFuzzer's limits see only what is touched or what its
# malloc hooks see, so a lazily backed calloc of a header-declared size
# (17 GB under overcommit) passes them; under `ulimit -v` it fails and is a
# finding (an abort), which is what `crate::alloc` exists to prevent.
#
#   series_assembler  random slice geometries through the series assembler
#   nifti_header      NIfTI header parsing (seeds: nibabel's test headers)
#   dicom_file        one DICOM file: parse, header, assemble, decode frame 0
#                     (seeds: pydicom's test files under 64 kB)
#   whole_case_nifti  the whole per-case path of `med3d preprocess` on a
#   whole_case_nrrd   mutated NIfTI file / NRRD file / DICOM series
#   whole_case_dicom  (src/fuzz.rs; seeds: tests/data/case_fuzz and
#                     pydicom's files)
#   gzip_inflaters    ISA-L and zlib-rs on the same bytes: the same output or
#                     both refuse (seeds: small gzip streams of every kind)
#
# Findings land in fuzz/artifacts/<target>/; a finding is fixed when its
# input goes into tests/data/ and a test runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-240}
AS_LIMIT_KB=${AS_LIMIT_KB:-4000000}
TARGETS=${TARGETS:-"series_assembler nifti_header dicom_file whole_case_nifti whole_case_nrrd whole_case_dicom gzip_inflaters"}
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH
SITE=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
# the fuzz binaries link libtorch through med3dinsight but get no run-path
export LD_LIBRARY_PATH="$SITE/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# scratch for whole_case's files: memory-backed when there is one
export FUZZ_SCRATCH=${FUZZ_SCRATCH:-$( [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")}
C=fuzz/corpus
mkdir -p $C/dicom_file $C/nifti_header $C/series_assembler $C/whole_case_nifti $C/whole_case_nrrd $C/whole_case_dicom $C/gzip_inflaters
find "$SITE/pydicom/data/test_files" -name '*.dcm' -size -64k -exec cp -n {} $C/dicom_file/ \;
for f in CT_small.dcm MR_small.dcm MR_small_RLE.dcm MR_small_jp2klossless.dcm JPGLosslessP14SV1_1s_1f_8b.dcm; do
  cp -n "$SITE/pydicom/data/test_files/$f" $C/whole_case_dicom/ 2>/dev/null || true
done
cp -n tests/data/case_fuzz/*.dcmseries $C/whole_case_dicom/
cp -n tests/data/case_fuzz/*.nii* $C/whole_case_nifti/
cp -n tests/data/case_fuzz/*.nrrd $C/whole_case_nrrd/
cp -n data/demo/nibabel_anatomical.nii $C/whole_case_nifti/ 2>/dev/null || true
.venv/bin/python - "$SITE" <<'PY'
import gzip, pathlib, sys
site = pathlib.Path(sys.argv[1])
out = pathlib.Path("fuzz/corpus/nifti_header")
for p in list((site / "nibabel/tests/data").glob("*.nii*")) + list(pathlib.Path("data/demo").glob("*.nii*")):
    raw = gzip.open(p).read(600) if p.suffix == ".gz" else p.read_bytes()[:600]
    (out / p.name.replace(".", "_")).write_bytes(raw)
# gzip_inflaters: small streams with every header field, levels, members
import zlib
g = pathlib.Path("fuzz/corpus/gzip_inflaters")
data = bytes((i * 7 + (i >> 5)) & 0xFF for i in range(3000))
for lvl in (0, 1, 9):
    (g / f"level{lvl}.gz").write_bytes(gzip.compress(data, compresslevel=lvl, mtime=0))
(g / "two_members.gz").write_bytes(gzip.compress(data[:1000], mtime=0) + gzip.compress(data[1000:], mtime=0))
(g / "empty.gz").write_bytes(gzip.compress(b"", mtime=0))
for p in (pathlib.Path("tests/data/case_fuzz")).glob("*.gz"):
    (g / p.name).write_bytes(p.read_bytes()[:65536])
PY
cd fuzz
# -O (without it cargo-fuzz turns debug assertions and overflow checks on for
# every crate, and openjp2 aborts on valid files); fuzz/Cargo.toml turns them on for
# med3d and dicom-rs.
cargo +nightly fuzz build -O -s none
# One target: its run, then one summary line and libFuzzer's final stats.
run_target() {
  local t=$1 bin=$1 input= log runs crash
  case $t in
    whole_case_nifti) bin=whole_case input=nifti ;;
    whole_case_nrrd) bin=whole_case input=nrrd ;;
    whole_case_dicom) bin=whole_case input=dicom ;;
  esac
  log=$(mktemp)
  mkdir -p "artifacts/$t"
  ( ulimit -v "$AS_LIMIT_KB"
    FUZZ_CASE_INPUT=$input cargo +nightly fuzz run -O -s none "$bin" "corpus/$t" -- \
      -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048 -malloc_limit_mb=2048 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 ) >"$log" 2>&1 || true
  runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -1 || true)
  crash=$(grep -E 'SUMMARY|panicked|ERROR: libFuzzer|Test unit written' "$log" | head -4 || true)
  { echo "$t: ${runs:-no final count} in ${SECS}s under ulimit -v ${AS_LIMIT_KB} KiB ${crash:+-- $crash}"
    grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed "s/^/  $t /" || true; }
  cp "$log" "artifacts/$t/last-run.log"
  rm -f "$log"
}
# JOBS targets at a time (default 1; each uses one core).
JOBS=${JOBS:-1}
mkdir -p artifacts
n=0
for t in $TARGETS; do
  run_target "$t" > "artifacts/.summary-$t" &
  n=$((n + 1))
  if [ $((n % JOBS)) -eq 0 ]; then wait; fi
done
wait
for t in $TARGETS; do cat "artifacts/.summary-$t"; rm -f "artifacts/.summary-$t"; done
