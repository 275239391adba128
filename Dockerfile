# Caravan's images, for those with Docker (or BuildKit, Podman, Kaniko):
#
#   docker build --target controller -t ghcr.io/caravan-dev/caravan-controller:0.2.0 .
#   docker build --target relay      -t ghcr.io/caravan-dev/caravan-relay:0.2.0 .
#
# Without a container engine, `make images` assembles the same images from
# the release binaries with umoci (scripts/image.sh). Both run as the
# non-root user 65532 with nothing in the image but the binary, its shared
# libraries and the CA certificates.

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev libssh2-1-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p caravan-controller -p caravan-relay -p caravan-agent \
 && mkdir -p /out \
 && cp target/release/caravan-controller target/release/caravan-relay target/release/caravan-agent /out/

# Debian's runtime libraries the binaries link (OpenSSL, libssh2, zlib), no shell use.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 libssh2-1 zlib1g \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd -g 65532 nonroot && useradd -u 65532 -g 65532 -d /home/nonroot -m -s /usr/sbin/nologin nonroot \
 && install -d -o 65532 -g 65532 /var/lib/caravan
USER 65532:65532
WORKDIR /

FROM runtime AS controller
COPY --from=build /out/caravan-controller /usr/local/bin/caravan-controller
# The agent of this release, which --agent-update auto rolls out.
COPY --from=build /out/caravan-agent /usr/local/bin/caravan-agent
ENTRYPOINT ["/usr/local/bin/caravan-controller"]

FROM runtime AS relay
COPY --from=build /out/caravan-relay /usr/local/bin/caravan-relay
ENTRYPOINT ["/usr/local/bin/caravan-relay"]

FROM runtime AS agent
COPY --from=build /out/caravan-agent /usr/local/bin/caravan-agent
ENTRYPOINT ["/usr/local/bin/caravan-agent"]
