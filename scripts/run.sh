#!/usr/bin/env bash
# Builds and runs both services on their embedded defaults (records in SQLite files under
# ./data, kept across restarts; in-process queues, sandbox gateway, simulated fleet): payment-system on 127.0.0.1:3001, deployment-system on
# 127.0.0.1:3002. Ctrl-C stops both gracefully.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
./target/debug/payment-system & PAY=$!
./target/debug/deployment-system & DEP=$!
stop() { kill -TERM "$PAY" "$DEP" 2>/dev/null || true; }
trap stop INT TERM
echo "payment-system:    http://127.0.0.1:3001/  (Andon board), POST /payment"
echo "deployment-system: http://127.0.0.1:3002/  (Andon board), POST /deploy"
echo "Ctrl-C stops both."
# wait returns early when a trapped signal arrives; wait again for the graceful exit
wait "$PAY" "$DEP" || true
wait "$PAY" "$DEP" 2>/dev/null || true
