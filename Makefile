# The operator's entry points. The two a newcomer needs: `make run` and `make test`.
# `make` (or `make help`) lists every target with one line; a target's line is the `##` comment
# right above it.
.DEFAULT_GOAL := help
.PHONY: help build run up down restart clean logs logs-payment logs-deployment test test-unit \
	check lint fmt bench stress-payment stress-deployment load spike chaos health status metrics view-grafana \
	view-prometheus view-jaeger demo-deploy

PAYMENT ?= http://127.0.0.1:3001
DEPLOYMENT ?= http://127.0.0.1:3002
# The full stack in containers (needs a Docker engine): both services, PostgreSQL, NATS, Redis,
# Vault, Prometheus, Grafana, Jaeger, Loki.
COMPOSE := $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
OPEN := $(shell command -v xdg-open || command -v open || echo echo)

## List every target with what it does.
help:
	@awk '/^## /{if(!c)d=substr($$0,4); c=1; next} /^[a-z][a-z-]*:/{if(c){split($$1,t,":"); printf "  make %-18s %s\n", t[1], d}} {c=0; d=""}' $(MAKEFILE_LIST)

## Build every binary (debug).
build:
	cargo build --workspace --bins

## Build and start both services on their embedded defaults (nothing to install); Ctrl-C stops both.
run:
	bash scripts/run.sh

## Start the full stack in containers (docker compose up, building the image).
up:
	$(COMPOSE) up -d --build

## Stop the container stack (its volumes stay).
down:
	$(COMPOSE) down

## Stop and start the container stack again.
restart: down up

## Remove build output, the embedded databases (./data) and the container stack's volumes.
clean:
	cargo clean
	rm -rf data
	-$(COMPOSE) down -v

## Follow the logs of every container.
logs:
	$(COMPOSE) logs -f

## Follow the payment service's container logs.
logs-payment:
	$(COMPOSE) logs -f payment-system

## Follow the deployment service's container logs.
logs-deployment:
	$(COMPOSE) logs -f deployment-system

## Every test against real backends started here (installed where missing), plus fmt and clippy.
test:
	bash scripts/test-env.sh bash scripts/check.sh

## Unit tests only (no backends, no binaries over HTTP).
test-unit:
	cargo test --workspace --lib --bins

## fmt and clippy, then the unit tests.
check: lint test-unit

## fmt check and clippy with warnings as errors.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## Format the code.
fmt:
	cargo fmt --all

## Payment throughput and latency against a bare JSON handler, in one run (release build, wrk).
bench:
	bash scripts/bench.sh

## Load a running payment service (`make run` first): STRESS_ARGS="--duration 30 --concurrency 64".
stress-payment:
	cargo run --release --bin stress-payment -- --url $(PAYMENT) $(STRESS_ARGS)

## Start 50 deployments at once against a running deployment service (`make run` first), follow each to its end, print a summary: STRESS_DEPLOY_ARGS="--deployments 50 --bake-secs 1".
stress-deployment:
	cargo run --release --bin stress-deployment -- --url $(DEPLOYMENT) $(STRESS_DEPLOY_ARGS)

## A steady minute of payments at 200 per second, 2% from the blocklisted demo customer.
load:
	cargo run --release --bin stress-payment -- --url $(PAYMENT) --duration 60 --rate 200 --fraud-share 0.02 $(STRESS_ARGS)

## A 15-second burst at 256 in flight: watch the rate limits, load shedding and Andon.
spike:
	cargo run --release --bin stress-payment -- --url $(PAYMENT) --duration 15 --concurrency 256 $(STRESS_ARGS)

## The chaos drills: faults under load (gateway timeouts, killed services, database and Redis restarts).
chaos:
	bash scripts/test-env.sh cargo test -p tai-blackbox --test blackbox -- chaos::

## Health of both running services.
health:
	@curl -fsS $(PAYMENT)/health && echo "  payment-system"
	@curl -fsS $(DEPLOYMENT)/health && echo "  deployment-system"

## Status of both running services: backends, breakers, queues, Andon.
status:
	@curl -fsS $(PAYMENT)/status; echo
	@curl -fsS $(DEPLOYMENT)/status; echo

## The Prometheus metrics both running services export.
metrics:
	@curl -fsS $(PAYMENT)/metrics
	@curl -fsS $(DEPLOYMENT)/metrics

## Open Grafana of the container stack (http://localhost:3000).
view-grafana:
	$(OPEN) http://localhost:3000

## Open Prometheus of the container stack (http://localhost:9090).
view-prometheus:
	$(OPEN) http://localhost:9090

## Open Jaeger of the container stack (http://localhost:16686).
view-jaeger:
	$(OPEN) http://localhost:16686

## The deployment service on the proc platform: two regions behind real HAProxy (Debian's
## haproxy must be installed), steady traffic, a rollout to a healthy and to a failing version.
demo-deploy:
	cargo build -p deployment-system --bins
	./target/debug/demo-deploy
