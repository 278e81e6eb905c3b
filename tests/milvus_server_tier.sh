#!/usr/bin/env bash
# The real-Milvus-server test tier.
#
# milvus==2.3.5 (PyPI, console script `milvus-server`) binds most of its ports on ALL
# interfaces, so it may only run inside a network namespace that has nothing but loopback.
# This script creates one (`unshare -n`; as a normal user `unshare -rn`), brings `lo` up and
# runs the tests marked `milvus_server` there with AGMAN_TEST_MILVUS_SERVER=1. The session
# fixture in tests/integration/conftest.py starts the server on 127.0.0.1:19530 with its data
# in a fresh directory under /tmp (the first start extracts ~250 MB into it) and stops it with
# SIGINT. PostgreSQL and Redis are unreachable inside the namespace; these tests use SQLite.
#
# Usage: bash tests/milvus_server_tier.sh [extra pytest args]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
if [ ! -x "$(dirname "$PYTHON")/milvus-server" ]; then
  echo "milvus-server not found next to $PYTHON; install the dev extra (milvus==2.3.5)" >&2
  exit 2
fi

DATA="$(mktemp -d /tmp/agman-milvus-server-XXXXXX)"
trap 'rm -rf "$DATA"' EXIT

if [ "$(id -u)" -eq 0 ]; then UNSHARE=(unshare -n); else UNSHARE=(unshare -rn); fi

cd "$ROOT"
"${UNSHARE[@]}" env AGMAN_TEST_MILVUS_SERVER=1 AGMAN_TEST_MILVUS_DATA="$DATA" \
  PYTHON="$PYTHON" bash -c '
    set -euo pipefail
    ip link set lo up
    exec "$PYTHON" -m pytest -m milvus_server tests/integration -q -p no:cacheprovider "$@"
  ' bash "$@"
