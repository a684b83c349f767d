#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, user postgres without a password) and Redis
# (127.0.0.1:6379) are installed and running. Installs them from the Debian archive
# where missing. Meant for development and CI machines, never for production.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_install=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
command -v psql >/dev/null 2>&1 || need_install+=(postgresql-client)
command -v redis-cli >/dev/null 2>&1 || need_install+=(redis-tools)
if [ ${#need_install[@]} -gt 0 ]; then
  log "installing ${need_install[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

pg_ready() { psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; }

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -z "$version" ]; then
    log "no PostgreSQL cluster found; creating one"
    version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
    as_root pg_createcluster "$version" main >/dev/null
  fi
  log "starting PostgreSQL $version"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  for _ in $(seq 1 50); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 0.2; done
fi

if ! pg_ready; then
  # A fresh Debian cluster asks for passwords on TCP: trust loopback (dev/CI only).
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  hba=/etc/postgresql/$version/main/pg_hba.conf
  log "allowing passwordless loopback connections in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  sleep 0.5
fi
pg_ready || { log "PostgreSQL is not reachable on 127.0.0.1:5432 as postgres"; exit 1; }

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  log "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no >/dev/null
  for _ in $(seq 1 50); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { log "Redis is not reachable on 127.0.0.1:6379"; exit 1; }
log "PostgreSQL and Redis are up"
