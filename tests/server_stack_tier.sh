#!/usr/bin/env bash
# The server-stack test tier: a real Milvus server, PostgreSQL and Redis, private to a
# loopback-only network namespace, with the tests marked `milvus_server` or `server_stack`.
#
# milvus==2.3.5 (PyPI, console script `milvus-server`) binds most of its ports on ALL
# interfaces, so it may only run inside a network namespace that has nothing but loopback.
# This script creates two (`unshare -n`; needs root) and runs pytest in both at once: one for
# the store's tests (tests/integration), one for the full stack's (tests/e2e), where it first
# starts a throwaway PostgreSQL cluster (127.0.0.1:5432 of the namespace, its own socket dir)
# and Redis (127.0.0.1:6379, AOF on, as in docker/). In each, the session fixture in
# tests/conftest.py starts a Milvus server on 127.0.0.1:19530 with its data in a fresh
# directory under /tmp (the first start extracts ~250 MB into it) and stops it with SIGINT.
# The fault tests restart Redis, PostgreSQL and Milvus mid-ingest (AGMAN_TEST_STACK_WORK).
# Everything is stopped and removed on exit.
#
# Usage: bash tests/server_stack_tier.sh [extra pytest args]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$(dirname "$PYTHON")/milvus-server" ]; then
  echo "milvus-server not found next to $PYTHON; install the dev extra (milvus==2.3.5)" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "server-stack tier: needs root (a network namespace, and PostgreSQL run as its own user)" >&2
  exit 2
fi
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
if [ -z "$PGBIN" ] || ! command -v redis-server >/dev/null; then
  echo "server-stack tier: needs PostgreSQL and redis-server installed (scripts/services.sh)" >&2
  exit 2
fi

WORK="$(mktemp -d /tmp/agman-server-stack-XXXXXX)"
chown postgres "$WORK"
trap 'rm -rf "$WORK"' EXIT

cd "$ROOT"
# The store's tests against the server (tests/integration, marked milvus_server: Milvus only,
# SQLite catalogues) run beside the full stack's (tests/e2e), each in its own namespace with
# its own Milvus server: the e2e fault tests freeze Milvus and restart Redis and PostgreSQL.
mkdir -p "$WORK/store"
# its own process group (setsid), so that an interrupted tier stops it and its Milvus server too
setsid unshare -n env PYTHON="$PYTHON" WORK="$WORK/store" bash -c '
  set -euo pipefail
  ip link set lo up
  export AGMAN_TEST_MILVUS_SERVER=1 AGMAN_TEST_MILVUS_DATA="$WORK/milvus"
  "$PYTHON" -m pytest -m milvus_server tests/integration -q -p no:cacheprovider "$@"
' bash "$@" > "$WORK/store.log" 2>&1 &
store_pid=$!
trap 'kill -- "-$store_pid" 2>/dev/null || true; rm -rf "$WORK"' EXIT
trap 'exit 130' INT TERM  # do not wait for the store half: exit, and the trap above stops it

stack_status=0
unshare -n env PYTHON="$PYTHON" PGBIN="$PGBIN" WORK="$WORK" bash -c '
  set -euo pipefail
  ip link set lo up
  runuser -u postgres -- "$PGBIN/initdb" -D "$WORK/pg" -U postgres --auth=trust -E UTF8 \
    --no-locale >/dev/null
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p 5432 -k $WORK" start >/dev/null
  mkdir -p "$WORK/redis"
  redis-server --bind 127.0.0.1 --port 6379 --save "" --appendonly yes --daemonize yes \
    --dir "$WORK/redis" --pidfile "$WORK/redis/redis.pid" --logfile "$WORK/redis/redis.log"
  stop() {
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null || true
    if [ -f "$WORK/redis/redis.pid" ]; then
      pid="$(cat "$WORK/redis/redis.pid")"
      kill "$pid" 2>/dev/null || true
      while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
  }
  trap stop EXIT
  export AGMAN_TEST_MILVUS_SERVER=1 AGMAN_TEST_SERVER_STACK=1 AGMAN_TEST_MILVUS_DATA="$WORK/milvus"
  export AGMAN_TEST_PG_ADMIN=postgresql://postgres@127.0.0.1:5432/postgres
  export AGMAN_TEST_REDIS_URL=redis://127.0.0.1:6379/0
  # what the fault tests (tests/e2e/test_stack_faults.py) need to restart Redis and PostgreSQL
  export AGMAN_TEST_STACK_WORK="$WORK" AGMAN_TEST_PGBIN="$PGBIN"
  "$PYTHON" -m pytest -m "milvus_server or server_stack" tests/e2e -q -p no:cacheprovider "$@"
' bash "$@" || stack_status=$?

store_status=0
wait "$store_pid" || store_status=$?
echo "--- the store against the Milvus server (tests/integration):"
cat "$WORK/store.log"
exit $(( stack_status != 0 ? stack_status : store_status ))
