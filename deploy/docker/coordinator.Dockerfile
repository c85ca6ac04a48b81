# The coordinator: a small image (Debian slim, one static-ish binary), running as a non-root
# user. Build from the repository root:
#   docker build -f deploy/docker/coordinator.Dockerfile -t seedsweep/coordinator:0.1.0 .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The coordinator needs no libtorch: only its package is built.
RUN cargo build --release --locked -p seedsweep-coordinator --bin coordinator

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/seedsweep --create-home seedsweep
COPY --from=build /src/target/release/coordinator /usr/local/bin/coordinator
USER 10001:10001
WORKDIR /var/lib/seedsweep
EXPOSE 50051 9090
ENTRYPOINT ["coordinator"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090"]
