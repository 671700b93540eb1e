# The operator's entry points. The two a newcomer needs: `make run` and `make test`.
.PHONY: run test check lint fmt build clean stress-payment up down bench demo-deploy

## Build and start both services on their embedded defaults (nothing to install). Ctrl-C stops both.
run:
	bash scripts/run.sh

## Every test, against real Redis, NATS JetStream and Prometheus that this starts (installing
## them where missing) on loopback ports of its own and stops afterwards. Also fmt and clippy.
test:
	bash scripts/test-env.sh bash scripts/check.sh

## fmt and clippy only.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

build:
	cargo build --workspace --bins

clean:
	cargo clean

## Load a running payment service (start it with `make run`): STRESS_ARGS="--duration 30 --concurrency 64".
stress-payment:
	cargo run --release --bin stress-payment -- $(STRESS_ARGS)

## The deployment service on the proc platform: two regions behind real HAProxy (Debian's
## haproxy must be installed), steady traffic, a rollout to a healthy and to a failing version.
demo-deploy:
	cargo build -p deployment-system --bins
	./target/debug/demo-deploy

## The full stack in containers (needs a Docker engine): both services, NATS, Redis, Vault,
## Prometheus, Grafana, Jaeger, Loki.
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)

up:
	$(COMPOSE) up -d --build

down:
	$(COMPOSE) down

## Payment throughput and latency against a bare JSON handler, in one run (release build, wrk).
bench:
	bash scripts/bench.sh
