#!/usr/bin/env bash
# One-shot GPU check (scripts/gpu_check.py): doctor, the paper preset's
# pretraining in bf16 (volumes/s, peak memory, loader share), bf16 vs fp32
# losses, the same step in PyTorch eager, partial OT on the device vs the
# CPU fused solver, MiniLM on the device vs the CPU, and a world-size-1
# NCCL run vs a single process, into one JSON report. `--cpu` runs it all
# on the CPU (shapes shrunk). See `scripts/gpu_check.sh --help`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
exec "$py" "$here/gpu_check.py" "$@"
