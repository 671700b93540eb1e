#!/usr/bin/env bash
# `make bench`: payment throughput and latency against a bare JSON handler, measured in one run
# on this machine (figures move between machines and runs; the ratio is what to compare).
#
#   baseline: the sandbox gateway's POST /v1/charges (axum, parse JSON, answer JSON)
#   payment:  payment-system's POST /payment on its embedded defaults (validation, rate limit,
#             velocity, fraud policy, breaker, in-process gateway, record, confirmation queue)
#   payment+redis (when redis-server is installed): the same with state, counters and limits in Redis
#
# wrk -t1 -c64, as in shared/BASELINES.md; BENCH_SECS (default 10) per run.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${BENCH_SECS:-10}
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
  else echo "bench: wrk is missing: sudo apt-get install wrk"; exit 1; fi
fi
cargo build --release --bins -q
STATE=$(mktemp -d /tmp/tai-bench.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]:-}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$STATE"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_up() { for _ in $(seq 1 100); do curl -fsS "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "bench: $1 did not come up"; exit 1; }

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
cat >"$STATE/payment.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local body = string.format('{"amount":"%d.%02d","currency":"USD","customer_id":"c%d","merchant_id":"m%d"}',
    math.random(1, 999), math.random(0, 99), math.random(1, 10000000), math.random(1, 1000))
  return wrk.format(nil, nil, nil, body)
end
LUA

run() { # name url script -> prints "name rps p50 p99"
  local out; out=$(wrk -t1 -c64 -d"${SECS}s" --latency -s "$3" "$2")
  local rps p50 p99 non2xx
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  non2xx=$(awk '/Non-2xx/ {print $4}' <<<"$out"); non2xx=${non2xx:-0}
  printf '%-16s %12s req/s   p50 %8s   p99 %8s   non-2xx %s\n' "$1" "$rps" "$p50" "$p99" "$non2xx"
  echo "$rps" >"$STATE/$1.rps"
}

GW=$(port); LISTEN_ADDR=127.0.0.1:$GW ./target/release/sandbox-gateway >"$STATE/gw.log" 2>&1 & PIDS+=($!)
PAY=$(port); LISTEN_ADDR=127.0.0.1:$PAY RUST_LOG=warn ./target/release/payment-system >"$STATE/pay.log" 2>&1 & PIDS+=($!)
wait_up "http://127.0.0.1:$GW/health"; wait_up "http://127.0.0.1:$PAY/health"
echo "bench: wrk -t1 -c64 -d${SECS}s on $(nproc) cores, server and load generator sharing them"
run baseline "http://127.0.0.1:$GW/v1/charges" "$STATE/charge.lua"
run payment "http://127.0.0.1:$PAY/payment" "$STATE/payment.lua"
if command -v redis-server >/dev/null; then
  RP=$(port); redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no >"$STATE/redis.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
  PR=$(port); LISTEN_ADDR=127.0.0.1:$PR REDIS_URL=redis://127.0.0.1:$RP RUST_LOG=warn ./target/release/payment-system >"$STATE/payr.log" 2>&1 & PIDS+=($!)
  wait_up "http://127.0.0.1:$PR/health"
  run payment+redis "http://127.0.0.1:$PR/payment" "$STATE/payment.lua"
fi
python3 - "$STATE" <<'PY'
import sys, os
d = sys.argv[1]
rps = {n[:-4]: float(open(os.path.join(d, n)).read()) for n in os.listdir(d) if n.endswith('.rps')}
base = rps.get('baseline')
for name in ('payment', 'payment+redis'):
    if name in rps and base:
        print(f"ratio {name} / baseline: {rps[name] / base:.2f}")
PY
