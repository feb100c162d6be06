# The Archipelago CSI image: `archip` (controller, node and the ublk device servers it spawns)
# and the tools the node plugin runs (mkfs, mount, modprobe).
#
#   docker build -t archip .                                  file and RADOS backends
#   docker build --build-arg FEATURES= -t archip .             file backend only (no librados)
#
# The builder runs e2e/k8s/build-release.sh, the same script CI can run; e2e/k8s/validate.sh
# checks offline that every path named here exists.

# One image for both chart layouts: backend.type=file and backend.type=rados.
ARG FEATURES="rados"

FROM rust:1.85-bookworm AS builder
ARG FEATURES
WORKDIR /src
# Manifests first, so the dependency download is cached apart from source edits.
COPY Cargo.toml Cargo.lock ./
COPY xseg/ xseg/
COPY peers/ peers/
COPY csi/ csi/
COPY node/ node/
COPY src/ src/
COPY tests/ tests/
COPY e2e/cluster/ e2e/cluster/
COPY e2e/setup.sh e2e/setup.sh
COPY e2e/k8s/build-release.sh e2e/k8s/build-release.sh
RUN ARCHIP_FEATURES="$FEATURES" e2e/k8s/build-release.sh \
    && install -D -m 0755 target/release/archip /out/archip

FROM debian:bookworm-slim
ARG FEATURES
# e2fsprogs/xfsprogs: mkfs and grow; util-linux: mount, blkid; kmod: modprobe ublk_drv.
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs xfsprogs util-linux kmod ca-certificates \
    && case "$FEATURES" in *rados*) apt-get install -y --no-install-recommends librados2 ;; esac \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/archip /usr/local/bin/archip
ENTRYPOINT ["/usr/local/bin/archip"]
