#!/usr/bin/env bash
# `make bench`: payment throughput, latency and memory against a bare JSON handler, measured in
# one run on this machine (figures move between machines and runs; the ratios are what to
# compare). With default logging, as a user runs it.
#
#   ceiling:  a bare axum handler: the sandbox gateway's POST /v1/charges (parse JSON, answer JSON)
#   embedded: payment-system on its embedded defaults (SQLite system of record, in-process
#             counters, queue and sandbox gateway)
#   pg+redis+js: the same on PostgreSQL + Redis + NATS JetStream (records, idempotency keys and
#             events in PostgreSQL, velocity and rate limits in Redis, confirmations and the event
#             stream in JetStream), when those servers are installed (`make test` installs them)
#   flood:    the embedded service under a flood of BENCH_CUSTOMERS (1,000,000) distinct
#             customers: its peak resident memory must level off
#
# Each: successful (2xx) payments/s, p50, p99, peak RSS; then each ratio to the ceiling.
# wrk -t1 -c64 (one connection-driving thread, 64 connections); BENCH_SECS (default 10) per run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SECS=${BENCH_SECS:-10}
CUSTOMERS=${BENCH_CUSTOMERS:-1000000}
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else echo "bench: wrk is missing: sudo apt-get install wrk"; exit 1; fi
fi
cargo build --release --bins -q
STATE=$(mktemp -d /tmp/tai-bench.XXXXXX)
PIDS=()
PG_PID=
cleanup() {
  for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done
  [ -n "$PG_PID" ] && kill -INT "$PG_PID" 2>/dev/null && sleep 1
  rm -rf "$STATE"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_up() { for _ in $(seq 1 100); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "bench: $1 did not come up"; exit 1; }
peak_rss_mb() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

cat >"$STATE/charge.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  wrk.headers["Idempotency-Key"] = "bench-" .. counter .. "-" .. math.random(1, 1000000000)
  return wrk.format(nil, nil, nil, '{"amount":"10.00","currency":"USD","reference":"r' .. counter .. '"}')
end
LUA
# distinct customers (one payment each, so velocity never blocks), 1000 merchants
cat >"$STATE/payment.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
seed = math.random(1, 1000000000)
request = function()
  counter = counter + 1
  local body = string.format('{"amount":"%d.%02d","currency":"USD","customer_id":"c%d_%d","merchant_id":"m%d"}',
    math.random(1, 999), math.random(0, 99), seed, counter, math.random(1, 1000))
  return wrk.format(nil, nil, nil, body)
end
LUA

run() { # name url script pid [secs] -> one line; figures kept for the ratios
  local out; out=$(wrk -t1 -c64 -d"${5:-$SECS}s" --latency -s "$3" "$2")
  local total secs non2xx ok p50 p99 rss
  total=$(awk '/requests in/ {print $1}' <<<"$out")
  # wrk writes the duration with a unit: 10.01s, 5.27m
  secs=$(awk '/requests in/ {d=$4; sub(/,$/, "", d); if (d ~ /m$/) {sub(/m$/, "", d); d*=60} else if (d ~ /h$/) {sub(/h$/, "", d); d*=3600} else {sub(/s$/, "", d)}; print d}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out"); non2xx=${non2xx:-0}
  ok=$(python3 -c "print(round(($total - $non2xx) / $secs))")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  rss=$(peak_rss_mb "$4")
  printf '%-12s %8s ok/s   p50 %8s   p99 %8s   peak RSS %4s MB   (%s requests, %s not 2xx)\n' \
    "$1" "$ok" "$p50" "$p99" "$rss" "$total" "$non2xx"
  echo "$ok" >"$STATE/$1.ok"
}

GW=$(port); LISTEN_ADDR=127.0.0.1:$GW RUST_LOG=warn ./target/release/sandbox-gateway >"$STATE/gw.log" 2>&1 & GW_PID=$!; PIDS+=($GW_PID)
PAY=$(port); LISTEN_ADDR=127.0.0.1:$PAY TAI_DATA_DIR="$STATE/embedded" MERCHANT_RATE_PER_SEC=100000 \
  ./target/release/payment-system >"$STATE/pay.log" 2>&1 & PAY_PID=$!; PIDS+=($PAY_PID)
wait_up "http://127.0.0.1:$GW/health"; wait_up "http://127.0.0.1:$PAY/health"
echo "bench: wrk -t1 -c64 -d${SECS}s on $(nproc) cores, server and load generator sharing them"
run ceiling "http://127.0.0.1:$GW/v1/charges" "$STATE/charge.lua" "$GW_PID"
run embedded "http://127.0.0.1:$PAY/payment" "$STATE/payment.lua" "$PAY_PID"

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
NATS_BIN="$ROOT/.tai/nats/bin/nats-server"
if command -v redis-server >/dev/null && [ -x "$NATS_BIN" ] && [ -n "$PG_BIN" ]; then
  RP=$(port); redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >"$STATE/redis.log" 2>&1 & PIDS+=($!)
  NP=$(port); "$NATS_BIN" -js -a 127.0.0.1 -p "$NP" -sd "$STATE/js" >"$STATE/nats.log" 2>&1 & PIDS+=($!)
  PGP=$(port); mkdir -p "$STATE/pg"
  as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
  if [ "$(id -u)" = 0 ]; then chmod 755 "$STATE"; chown postgres "$STATE/pg"; fi
  as_pg "$PG_BIN/initdb" -D "$STATE/pg/data" -U tai --auth=trust >/dev/null
  # durable as in production: fsync on, commits wait for the WAL flush
  as_pg "$PG_BIN/postgres" -D "$STATE/pg/data" -p "$PGP" -k "$STATE/pg" -c listen_addresses=127.0.0.1 \
    >"$STATE/pg.log" 2>&1 &
  for _ in $(seq 1 100); do "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PGP" && break; sleep 0.1; done
  PG_PID=$(head -n 1 "$STATE/pg/data/postmaster.pid")
  for _ in $(seq 1 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
  PR=$(port); LISTEN_ADDR=127.0.0.1:$PR DATABASE_URL="postgres://tai@127.0.0.1:$PGP/postgres" \
    REDIS_URL=redis://127.0.0.1:$RP NATS_URL=nats://127.0.0.1:$NP MERCHANT_RATE_PER_SEC=100000 \
    ./target/release/payment-system >"$STATE/payr.log" 2>&1 & PR_PID=$!; PIDS+=($PR_PID)
  wait_up "http://127.0.0.1:$PR/health"
  run pg+redis+js "http://127.0.0.1:$PR/payment" "$STATE/payment.lua" "$PR_PID"
else
  echo "pg+redis+js  skipped: needs redis-server, PostgreSQL and .tai/nats (make test installs them)"
fi

if [ "$CUSTOMERS" -gt 0 ]; then
  # long enough for CUSTOMERS distinct customers at the embedded rate just measured, with room
  # for the rate to fall as the database grows (1.3 times fell short at 963,345 of a million)
  rate=$(cat "$STATE/embedded.ok")
  flood_secs=$(python3 -c "import math; print(max(5, math.ceil($CUSTOMERS / max($rate, 1) * 1.8)))")
  echo "flood: ${flood_secs}s of distinct customers against the embedded service"
  run flood "http://127.0.0.1:$PAY/payment" "$STATE/payment.lua" "$PAY_PID" "$flood_secs"
fi
python3 - "$STATE" <<'PY'
import sys, os
d = sys.argv[1]
ok = {n[:-3]: float(open(os.path.join(d, n)).read()) for n in os.listdir(d) if n.endswith('.ok')}
base = ok.get('ceiling')
for name in ('embedded', 'pg+redis+js'):
    if name in ok and base:
        print(f"ratio {name} / ceiling: {ok[name] / base:.2f}")
PY
