# One image, `tai:local`, built once, holds every TAI binary; the compose stack runs each service
# from it (`command:` names the binary).
#
# Layers, from the most to the least cached:
#   chef     the toolchain and cargo-chef (changes only with this file)
#   planner  recipe.json: the workspace's manifests and Cargo.lock, with the sources stripped
#   build    `cargo chef cook` builds every dependency from the recipe (reused until a Cargo.toml
#            or Cargo.lock changes), then the workspace itself is built on top of it
# Every cargo command uses --locked: Cargo.lock is the truth, and a build that would change it
# fails.
# Works with the classic builder and BuildKit alike (no cache mounts).

FROM rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.77
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
# The cached dependency layer: same profile and targets as the build below.
RUN cargo chef cook --release --locked --workspace --bins --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out \
 && cp target/release/payment-system \
       target/release/sandbox-gateway \
       target/release/stress-payment \
       target/release/deployment-system \
       target/release/stress-deployment \
       target/release/demo-service \
       target/release/demo-deploy \
       /out/

FROM debian:bookworm-slim
# curl: the compose health checks; ca-certificates: TLS to backends outside the stack.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tai \
 && useradd --system --uid 10001 --gid tai --home-dir /var/lib/tai --create-home \
      --shell /usr/sbin/nologin tai
COPY --from=build /out/ /usr/local/bin/
# The data files the compose stack points at (FRAUD_RULES_PATH, FLEET_FIXTURE_PATH); both are
# also built into the binaries.
COPY config/fraud_rules.toml config/fleet.toml /etc/tai/
USER 10001:10001
# The embedded defaults keep ./data relative to here (compose uses PostgreSQL instead).
WORKDIR /var/lib/tai
ENV LOG_FORMAT=json RUST_LOG=info
EXPOSE 3001 3002 3901
# Every binary stops gracefully on SIGTERM (drains, then exits 0). Exec form, no shell and no
# ENTRYPOINT wrapper: the binary named by CMD (or by compose's `command:`) is PID 1 and gets
# the signal itself.
STOPSIGNAL SIGTERM
CMD ["payment-system"]
