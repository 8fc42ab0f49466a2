#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ for SECS seconds each (default 240)
# and prints each one's execution count. Needs the nightly toolchain and
# cargo-fuzz (`cargo install cargo-fuzz`). Seeds: pydicom's small test files
# for dicom_file, NIfTI headers from nibabel's test data for nifti_header.
# Crashes land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-240}
export LIBTORCH_USE_PYTORCH=1 VIRTUAL_ENV=$PWD/.venv PATH=$PWD/.venv/bin:$PATH
SITE=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
# the fuzz binaries link libtorch through med3dinsight but get no run-path
export LD_LIBRARY_PATH="$SITE/torch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
mkdir -p fuzz/corpus/dicom_file fuzz/corpus/nifti_header fuzz/corpus/series_assembler
find "$SITE/pydicom/data/test_files" -name '*.dcm' -size -64k -exec cp -n {} fuzz/corpus/dicom_file/ \;
.venv/bin/python - "$SITE" <<'PY'
import gzip, pathlib, sys
site = pathlib.Path(sys.argv[1])
out = pathlib.Path("fuzz/corpus/nifti_header")
for p in list((site / "nibabel/tests/data").glob("*.nii*")) + list(pathlib.Path("data/demo").glob("*.nii*")):
    raw = gzip.open(p).read(600) if p.suffix == ".gz" else p.read_bytes()[:600]
    (out / p.name.replace(".", "_")).write_bytes(raw)
PY
cd fuzz
cargo +nightly fuzz build -s none -a
for t in series_assembler nifti_header dicom_file; do
  log=$(mktemp)
  cargo +nightly fuzz run -s none -a "$t" -- -max_total_time="$SECS" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || true
  runs=$(grep -Eo 'Done [0-9]+ runs' "$log" | tail -1 || true)
  crash=$(grep -E 'SUMMARY|panicked|crash-' "$log" | head -3 || true)
  echo "$t: ${runs:-no final count} in ${SECS}s ${crash:+-- $crash}"
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed "s/^/  $t /" || true
  rm -f "$log"
done
