# syntax=docker/dockerfile:1
# armd: multi-stage build. Build stage compiles librdkafka (vendored by the rdkafka crate) and armd;
# the runtime stage is a slim Debian with a non-root user.

FROM rust:1.95.0-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config python3 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin armd \
 && strip target/release/armd

FROM debian:12.12-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/armd --create-home armd
COPY --from=build /src/target/release/armd /usr/local/bin/armd
COPY config/armd.toml /etc/armd/armd.toml
# Smoke step: the binary runs in this image.
RUN armd --version
USER armd
WORKDIR /var/lib/armd
# Metrics, /healthz and /readyz. The default config listens on loopback; containers listen on all interfaces.
ENV ARMD__HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9464/healthz || exit 1
ENTRYPOINT ["armd"]
CMD ["run", "--config", "/etc/armd/armd.toml"]
