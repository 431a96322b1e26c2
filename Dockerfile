# syntax=docker/dockerfile:1
#
# The portcullis image: the static binary plus Debian's iptables (nft and
# legacy variants) for `portcullis init`. One image serves both roles in a
# pod (deploy/kubernetes/): the init container (root, NET_ADMIN + NET_RAW)
# runs `init`, the sidecar (uid/gid 1337) runs `run`.
#
#   docker build -t registry.example.com/portcullis:0.1.0 .
#   docker push registry.example.com/portcullis:0.1.0
#
# tests/static_binary.rs checks that the runtime stage installs every
# Debian package that `portcullis init` was seen to need in a chroot.

# ---------------------------------------------------------------- builder
# Debian 12 (bookworm) with the Rust toolchain; scripts/build-static.sh links
# the binary statically against glibc (crt-static) and strips it.
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY scripts/build-static.sh ./scripts/build-static.sh
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-static.sh \
 && install -D -m 0755 target/static/portcullis /out/portcullis

# ---------------------------------------------------------------- runtime
# bookworm-slim, as the builder: iptables and its libraries from Debian.
FROM debian:bookworm-slim
# iptables: xtables-nft-multi and xtables-legacy-multi (iptables-nft-restore,
# iptables-legacy-restore, ip6tables-*, -save) and the extensions
# (/usr/lib/x86_64-linux-gnu/xtables: owner, comment, REDIRECT, ...).
# The libraries are also what `iptables` depends on; they are listed so that
# the image says what it holds and the test can check it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      iptables \
      libip4tc2 \
      libip6tc2 \
      libxtables12 \
      libnftnl11 \
      libmnl0 \
      libnetfilter-conntrack3 \
      libnfnetlink0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/portcullis /usr/local/bin/portcullis
# The proxy's default identity ([redirect] proxy_uid/proxy_gid); the init
# container overrides it with runAsUser: 0.
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "-c", "/etc/portcullis/config.toml"]
