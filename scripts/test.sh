#!/usr/bin/env bash
# The one test command (`make test`): installs everything from the lockfile, checks lint and
# types, proves each service installs alone, then runs the whole suite.
#
# Redis: REDIS_URL when set, otherwise the suite starts a private valkey-server on a free port.
# PostgreSQL: TEST_POSTGRES_URL when set, otherwise 127.0.0.1:5432 when it answers; without one
# the PostgreSQL tests are skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
uv() { scripts/uv.sh "$@"; }

# Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set (as on our CI machines)
# every service process the tests start would otherwise compile its imports again (~4 s CPU).
uv sync --locked --all-packages --quiet --compile-bytecode
uv run --no-sync python -m compileall -q packages services tests bench migrations >/dev/null
uv run --no-sync ruff check .
uv run --no-sync ruff format --check --quiet .
uv run --no-sync mypy
scripts/check-standalone.sh
uv run --no-sync pytest "$@"
