#!/usr/bin/env bash
# Runs every test: unit, property, in-process and black-box (the real binary against
# real PostgreSQL and Redis, which are started or installed first; the official openai
# Python SDK against the gateway for every provider; the sign-in page in headless
# chromium, installed first too), the criterion benches once each in test mode, and a
# short smoke run of the load harness (which
# asserts that it runs and that usage rows == successes with one row per id, never
# timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# The openai Python SDK test (tests/it/providers.rs) builds a venv under target/: it needs
# python3 with venv and ensurepip, installed here from the Debian archive if missing.
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  echo "[test] installing python3-venv" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
bash scripts/browser.sh
threads=${TEST_THREADS:-2}
cargo test --workspace --lib --bins --tests -- --test-threads "$threads"
cargo test --bench hot_path
cargo build --release --quiet
cargo bench --bench load -- --smoke
