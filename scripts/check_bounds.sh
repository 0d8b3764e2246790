#!/usr/bin/env bash
# Runs the suite at the lowest (or highest) dependency versions pyproject.toml allows, in a venv
# of its own, so a lower bound is a fact and not a wish. Usage: scripts/check_bounds.sh [lowest|highest] [pytest args]
# Needs uv (pip install uv). Never touches .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-lowest}"; shift || true
case "$mode" in
  lowest) resolution=lowest-direct ;;
  highest) resolution=highest ;;
  *) echo "usage: $0 [lowest|highest] [pytest args]" >&2; exit 2 ;;
esac
venv=".venv-$mode"
uv=$(command -v uv || echo .venv/bin/uv)
rm -rf "$venv"
"$uv" venv -q --python "$(command -v python3)" "$venv"
# PIP_CONSTRAINT would pin CI's versions: this run is about the ranges alone.
env -u PIP_CONSTRAINT -u UV_CONSTRAINT "$uv" pip install -q --python "$venv/bin/python" \
  --resolution "$resolution" -e '.[test,ray]'
"$uv" pip freeze --python "$venv/bin/python" | grep -iE '^(pydantic|pydantic-settings|tomli-w|tomlkit|nvidia-ml-py|docker|psutil|sanic|sanic-ext|watchfiles|swagger-ui-bundle|prometheus-client|pytest|pytest-asyncio|pytest-timeout|httpx|schemathesis|playwright|ray)=='
"$venv/bin/python" -m pytest "$@"
