#!/usr/bin/env bash
# The whole test suite: the import contracts and ruff, then unit + integration (Milvus Lite,
# SQLite, PostgreSQL, Redis + Celery workers), the real-data tier when ../shared exists, then
# the server-stack tier (a real Milvus server, PostgreSQL, Redis and Celery workers in a
# loopback-only network namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# the layers (import-linter contracts in pyproject.toml) and the lint rules, before any test
.venv/bin/lint-imports --no-cache
.venv/bin/ruff check .
# two test processes (one per core), each test file whole in one of them: the e2e modules'
# steps run in order on a deployment their module builds
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
bash tests/server_stack_tier.sh
