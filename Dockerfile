# med3d on a CUDA machine. Build:  docker build --build-arg GIT_HASH=$(git rev-parse --short=12 HEAD) -t med3d .
# Run:    docker run --gpus all -v $PWD/data:/data -v $PWD/work:/work med3d run --config /data/experiment.yaml
# Check:  docker run --gpus all med3d doctor
#
# Builder and runtime share one venv path (/opt/venv), so the run-path
# build.rs embeds (the venv's torch/lib) is valid in the runtime. The builder
# is the CUDA devel image: the c10d bridge's NCCL path and the CUDA
# allocator statistics compile against the toolkit's headers (CUDA_HOME;
# nccl.h comes from torch's nvidia-nccl wheel) and gloo's (libgloo-dev;
# gloo itself is inside libtorch). The binary keeps libtorch_cuda NEEDED
# (build.rs), and the builder refuses an image whose binary lacks it or
# lacks NCCL. At run time med3d needs only the venv's torch (its CUDA
# runtime, cuDNN and NCCL come as nvidia wheels) and the host's driver,
# which `--gpus` mounts; the runtime base is the CUDA runtime image for its
# NVIDIA_* settings and a libcuda-compatible userland.
ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG BUILD_BASE=nvidia/cuda:13.0.1-devel-ubuntu24.04

FROM ${BUILD_BASE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl git libgloo-dev python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ARG GIT_HASH=unknown
ENV PATH=/root/.cargo/bin:/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    CUDA_HOME=/usr/local/cuda \
    LIBTORCH_USE_PYTORCH=1 \
    MED3D_GIT_HASH=${GIT_HASH}
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY src ./src
COPY vendor ./vendor
RUN cargo build --release --locked \
 && readelf -d target/release/med3d | grep -q 'libtorch_cuda.so' \
 && nm -DC --undefined-only target/release/med3d | grep -q 'c10d::ProcessGroupNCCL::ProcessGroupNCCL(' \
 && strip target/release/med3d \
 && cp target/release/med3d /usr/local/bin/med3d

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0
COPY --from=builder /usr/local/bin/med3d /usr/local/bin/med3d
# Fails the build if a library the binary needs does not resolve here.
RUN med3d doctor
WORKDIR /work
ENTRYPOINT ["med3d"]
CMD ["--help"]
