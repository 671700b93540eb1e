#!/usr/bin/env bash
# What `make test` runs once the backends are up: format, lints, build, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# the black-box tests start the built binaries, so build them before testing
cargo build --workspace --bins
cargo test --workspace
