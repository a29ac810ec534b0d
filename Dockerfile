# Build stage: the same release build as `cargo build --release --locked`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# benches/ is needed too: Cargo.toml declares the `routing` bench target, and cargo
# refuses to load a manifest whose declared targets are missing.
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked

# Runtime stage.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/clearml-edge /usr/local/bin/clearml-edge
COPY config/edge.toml /etc/clearml-edge/edge.toml
USER 65532:65532
# 8080 plain HTTP, 8443 HTTPS (with deploy/tls), 9901 admin (/healthz, /readyz, /metrics).
EXPOSE 8080 8443 9901
ENTRYPOINT ["clearml-edge"]
CMD ["run", "--config", "/etc/clearml-edge/edge.toml"]
