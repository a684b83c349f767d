#!/usr/bin/env bash
# Makes sure Debian's chromium and chromedriver are installed: the sign-in page test
# (tests/it/oauth.rs) drives a real headless browser over WebDriver. Quick when both are
# already there. Meant for development and CI machines.
set -euo pipefail

log() { printf '[browser] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

chromium=${CHROMIUM:-/usr/bin/chromium}
chromedriver=${CHROMEDRIVER:-/usr/bin/chromedriver}
if [ -x "$chromium" ] && [ -x "$chromedriver" ]; then
  exit 0
fi
log "installing chromium and chromium-driver"
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
[ -x "$chromium" ] && [ -x "$chromedriver" ] || { log "chromium or chromedriver missing after install"; exit 1; }
