# syntax=docker/dockerfile:1
# med3d for GPU batch jobs (CUDA through torch's wheels) and CPU machines.
#
# Online build (Docker or podman, registries and rustup reachable):
#   docker build --build-arg GIT_HASH=$(git rev-parse --short=12 HEAD) -t med3d .
# Offline build (no container registry, no rustup; what `make docker-check`
# does, scripts/docker_check.sh): a Debian base made with debootstrap, and
# the host's Rust toolchain handed to the build as a build-time volume:
#   podman build --network host --build-arg BASE=localhost/debian:bookworm \
#     --build-arg RUST_HOME=/opt/rust -v "$(rustc --print sysroot)":/opt/rust:ro -t med3d .
# Behind a TLS-intercepting proxy, hand its CA bundle the same way:
#     -v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro --build-arg CA_BUNDLE=/run/host-ca.crt
# Run (GPU host with the NVIDIA container toolkit; NCCL needs shared memory):
#   docker run --gpus all --ipc host --network host -v $PWD/data:/data -v $PWD/work:/work \
#     --user "$(id -u):$(id -g)" med3d run --config /data/experiment.yaml
#
# Design:
# - One plain Debian base for both stages (BASE): no nvidia/cuda image is
#   needed. torch 2.11.0's wheel brings its CUDA runtime, cuDNN and NCCL as
#   nvidia-* wheels; the NCCL bridge compiles against nccl.h from that wheel
#   and the CUDA headers of the nvidia-cuda-crt / -cccl wheels
#   (requirements.txt), found by build.rs in the venv. On a GPU host the
#   container toolkit mounts the driver (libcuda) for `--gpus`.
# - The Rust toolchain: rustup by default (online). RUST_HOME names a
#   toolchain folder (a rustc sysroot: bin/cargo, bin/rustc, lib/) that the
#   build is handed instead, as a build-time volume (`podman build -v`):
#   nothing is downloaded for it and nothing of it stays in an image layer.
#   A build-time volume rather than a build context, because a toolchain is
#   ~1.5 GB that a context would copy into the builder on every build.
# - One venv (/opt/venv) built once in the builder and copied whole into the
#   runtime, so torch is downloaded once and the run-path build.rs embeds
#   (the venv's torch/lib) is valid in both. Caches (pip, cargo) are cache
#   mounts, kept out of the layers.
# - CA_BUNDLE (a path inside the build) is the CA bundle pip, curl and cargo
#   trust while building, for networks that intercept TLS; it is not kept
#   in the image.
# - The builder refuses a binary without libtorch_cuda NEEDED or without
#   ProcessGroupNCCL (grep without -q: under pipefail an early exit would
#   fail the pipeline by SIGPIPE); the runtime runs `med3d doctor`, so a library that does
#   not resolve fails the build.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends binutils build-essential ca-certificates curl git libgloo-dev libisal-dev python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ARG CA_BUNDLE=
COPY requirements-image.txt /tmp/requirements-image.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "${CA_BUNDLE}" ]; then export PIP_CERT="${CA_BUNDLE}"; fi; \
    python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --disable-pip-version-check -r /tmp/requirements-image.txt
ARG RUST_HOME=
ARG RUST_VERSION=1.95.0
RUN if [ -n "${CA_BUNDLE}" ]; then export CURL_CA_BUNDLE="${CA_BUNDLE}" SSL_CERT_FILE="${CA_BUNDLE}"; fi; \
    if [ -n "${RUST_HOME}" ]; then \
      "${RUST_HOME}/bin/cargo" --version; \
    else \
      curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"; \
    fi
ARG GIT_HASH=unknown
ENV PATH=${RUST_HOME:+${RUST_HOME}/bin:}/root/.cargo/bin:/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    LIBTORCH_USE_PYTORCH=1 \
    MED3D_GIT_HASH=${GIT_HASH}
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY src ./src
COPY vendor ./vendor
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -n "${CA_BUNDLE}" ]; then export CARGO_HTTP_CAINFO="${CA_BUNDLE}"; fi; \
    cargo build --release --locked \
 && readelf -d target/release/med3d | grep 'libtorch_cuda.so' >/dev/null \
 && nm -DC --undefined-only target/release/med3d | grep 'c10d::ProcessGroupNCCL::ProcessGroupNCCL(' >/dev/null \
 && nm target/release/med3d | grep med3d_isal_load >/dev/null \
 && strip target/release/med3d \
 && cp target/release/med3d /usr/local/bin/med3d

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libgomp1 libisal2 python3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --shell /bin/bash med3d \
 && mkdir -p /work /data \
 && chown med3d:med3d /work
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /usr/local/bin/med3d /usr/local/bin/med3d
# The container toolkit exposes every GPU and the compute and utility
# libraries (nvidia-smi) when run with --gpus.
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATH=/opt/venv/bin:$PATH
# Fails the build if a library the binary needs does not resolve here.
RUN med3d doctor
# numeric, so that hosts without this user name resolve it
USER 1000:1000
WORKDIR /work
ENTRYPOINT ["med3d"]
CMD ["--help"]
