#!/usr/bin/env bash
# Runs Tollgate locally: PostgreSQL and Redis (started or installed if needed), the
# database migrated and seeded, the bundled mock provider, and the gateway in front of
# it. Prints a dev token and a curl line that works. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/services.sh
cargo build --release --quiet
bin=target/release/tollgate

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/tollgate}
db=${DATABASE_URL##*/}
psql -h 127.0.0.1 -U postgres -d postgres -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE \"$db\""
$bin migrate
$bin seed >/dev/null

mock_port=${MOCK_PORT:-9000}
gw_port=${PORT:-8080}
# Every provider (OpenAI, Anthropic, Gemini) is the bundled mock, so it works offline.
export OPENAI_API_KEY=${OPENAI_API_KEY:-sk-mock}
export ANTHROPIC_API_KEY=${ANTHROPIC_API_KEY:-sk-mock}
export GEMINI_API_KEY=${GEMINI_API_KEY:-sk-mock}
export TOLLGATE__PROVIDERS__OPENAI__BASE_URL=${TOLLGATE__PROVIDERS__OPENAI__BASE_URL:-http://127.0.0.1:$mock_port/v1}
export TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL=${TOLLGATE__PROVIDERS__ANTHROPIC__BASE_URL:-http://127.0.0.1:$mock_port}
export TOLLGATE__PROVIDERS__GOOGLE__BASE_URL=${TOLLGATE__PROVIDERS__GOOGLE__BASE_URL:-http://127.0.0.1:$mock_port}
export TOLLGATE__SERVER__LISTEN=${TOLLGATE__SERVER__LISTEN:-127.0.0.1:$gw_port}

email=dev@tollgate.local
if $bin user create --email "$email" --password dev-password --no-subscription >/dev/null 2>&1; then
  $bin credits grant --email "$email" --amount 10000
fi
token=$($bin token issue --email "$email" --ttl 86400)

$bin mock-provider --listen "127.0.0.1:$mock_port" --latency-ms 20 --chunk-interval-ms 30 >/dev/null &
mock_pid=$!
trap 'kill $mock_pid 2>/dev/null || true' EXIT

cat <<MSG

Tollgate dev stack
  gateway:        http://$TOLLGATE__SERVER__LISTEN   (mock provider on 127.0.0.1:$mock_port)
  dev user:       $email, password dev-password (10000 credits on first run)
  OAuth metadata: http://$TOLLGATE__SERVER__LISTEN/.well-known/oauth-authorization-server
  dev token:      $token

Try it:
  curl -s http://$TOLLGATE__SERVER__LISTEN/v1/chat/completions -H "Authorization: Bearer $token" -H 'Content-Type: application/json' -d '{"model":"gpt-5","messages":[{"role":"user","content":"Hello"}]}'
  (models: gpt-5, claude-3.5-sonnet, gemini-2.0-pro — all answered by the mock)

MSG
exec_status=0
$bin serve || exec_status=$?
exit $exec_status
