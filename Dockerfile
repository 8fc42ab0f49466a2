# med3d on a CUDA machine. Build:  docker build -t med3d .
# Run:    docker run --gpus all -v $PWD/data:/data -v $PWD/work:/work med3d run --config /data/experiment.yaml
#
# Builder and runtime share one venv path (/opt/venv), so the run-path
# build.rs embeds (the venv's torch/lib) is valid in the runtime. The builder
# is the CUDA devel image: the c10d bridge's NCCL path compiles against the
# toolkit's headers (and gloo's, from libgloo-dev; gloo itself is inside
# libtorch, so the runtime needs neither).
ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG BUILD_BASE=nvidia/cuda:13.0.1-devel-ubuntu24.04

FROM ${BUILD_BASE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential ca-certificates curl libgloo-dev python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain 1.95.0
ENV PATH=/root/.cargo/bin:/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    CUDA_HOME=/usr/local/cuda \
    LIBTORCH_USE_PYTORCH=1
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs rustfmt.toml ./
COPY src ./src
RUN cargo build --release --locked && cp target/release/med3d /usr/local/bin/med3d

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0
COPY --from=builder /usr/local/bin/med3d /usr/local/bin/med3d
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.12/site-packages/torch/lib
WORKDIR /work
ENTRYPOINT ["med3d"]
CMD ["--help"]
