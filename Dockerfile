# syntax=docker/dockerfile:1
#
# wsotel container image: a multi-stage build.
#   builder  Rust toolchain; `cargo build --release --locked -p wsotel`, the server only (the
#            release profile keeps line tables for readable panics and profiles: Cargo.toml
#            [profile.release])
#   runtime  debian:bookworm-slim (same glibc as the builder), the binary only, non-root
#   probe    a static busybox for the healthchecks of the stack's third-party images (the
#            collector has no shell or HTTP client); see compose.yaml
#
#   docker build -t wsotel .                      # the runtime image (last stage)
#   docker run --rm -p 8080:8080 -p 9464:9464 wsotel
#
# Rust 1.89: the newest rust-version any locked dependency declares (async-nats 0.51, the
# backplane's client; tonic 0.14.9 needs 1.88). scripts/check-deploy holds this against the locked
# dependency graph (cargo metadata).
ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS builder
WORKDIR /src
# The whole workspace: cargo loads every member's manifest (bench/, otlp-receiver/) even to
# build one package, and --locked holds them to Cargo.lock. Only wsotel is compiled.
COPY . .
# Cache mounts keep the registry and incremental artifacts between builds (BuildKit); the
# binary is copied out of the cache mount within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p wsotel \
 && install -D -m 0755 target/release/wsotel /out/wsotel

FROM debian:${DEBIAN_RELEASE}-slim AS probe
RUN apt-get update \
 && apt-get install -y --no-install-recommends busybox-static \
 && rm -rf /var/lib/apt/lists/*
# compose.yaml's `stack-init` service copies /bin/busybox into a shared volume.

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# glibc, libgcc_s and bash (for the healthcheck) are in the slim image already; wsotel needs
# no TLS library (https is not supported: OTLP goes to a local collector).
RUN groupadd --system --gid 10001 wsotel \
 && useradd --system --uid 10001 --gid wsotel --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin wsotel
COPY --from=builder /out/wsotel /usr/local/bin/wsotel
USER 10001:10001
# In a container the admin listener must not be loopback-only, or nothing can scrape it.
ENV WSOTEL_LISTEN=0.0.0.0:8080 \
    WSOTEL_ADMIN_LISTEN=0.0.0.0:9464 \
    WSOTEL_LOG_FORMAT=json
EXPOSE 8080 9464
# SIGTERM drains: /readyz turns 503, every connection gets Close 1001, then exit 0.
STOPSIGNAL SIGTERM
# Ready = /readyz answers 200 (no curl in the image: bash's /dev/tcp).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/9464 && printf 'GET /readyz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["/usr/local/bin/wsotel"]
