#!/usr/bin/env bash
# Runs every test: unit, property, in-process and black-box (the real binary against
# real PostgreSQL and Redis, which are started or installed first; the sign-in page in
# headless chromium, installed first too), the criterion benches once each in test mode, and a short smoke run of the load harness (which
# asserts that it runs and that usage rows == successes, never timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/browser.sh
threads=${TEST_THREADS:-2}
cargo test --lib --bins --tests -- --test-threads "$threads"
cargo test --bench hot_path
cargo build --release --quiet
cargo bench --bench load -- --smoke
