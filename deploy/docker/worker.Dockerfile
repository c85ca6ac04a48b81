# The worker: CUDA runtime and libtorch 2.13 (PyPI's torch==2.13.0+cu130, installed by the same
# scripts/libtorch.sh the README uses, into the same cache path in both stages so the binary's
# rpath finds it), running as a non-root user. Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t seedsweep/worker:0.1.0 .
# Run with the NVIDIA container toolkit: docker run --gpus all seedsweep/worker:0.1.0 --gpu 0 ...
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/pip
ENV SEEDSWEEP_CACHE=/opt/seedsweep/cache \
    SEEDSWEEP_PYTHON=/opt/pip/bin/python
WORKDIR /src
COPY scripts/libtorch.sh scripts/env.sh scripts/
RUN scripts/libtorch.sh
COPY . .
RUN bash -c 'source scripts/env.sh && cargo build --release --locked -p seedsweep-worker --bin worker' \
 && ldd target/release/worker | grep -q libtorch_cuda.so

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
COPY --from=build /opt/seedsweep/cache/libtorch-2.13.0 /opt/seedsweep/cache/libtorch-2.13.0
COPY --from=build /src/target/release/worker /usr/local/bin/worker
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/seedsweep --create-home seedsweep
USER 10001:10001
WORKDIR /var/lib/seedsweep
EXPOSE 9091
ENTRYPOINT ["worker"]
