#!/usr/bin/env bash
# What `make test` runs once the backends are up: format, lints, build, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# the black-box tests start the built binaries, so build them before testing
cargo build --workspace --bins
# examples/signal-service picks its own serde features (no arbitrary_precision, which breaks
# #[serde(flatten)]), so it is built and tested on its own, as another team's crate would be;
# built last, its binary is the one the black-box tests start
cargo build -p signal-service --bins
cargo test --workspace --exclude signal-service
cargo test -p signal-service
