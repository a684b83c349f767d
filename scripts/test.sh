#!/usr/bin/env bash
# Runs every test: unit, property, in-process and black-box (the real binary against
# real PostgreSQL and Redis, which are started or installed first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
cargo build --quiet --all-targets
cargo test --all-targets -- --test-threads "${TEST_THREADS:-2}"
