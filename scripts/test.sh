#!/usr/bin/env bash
# The README's test command: set up, then lint, type-check, check import
# layers, and run the whole test suite (unit, integration, slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
start=$(date +%s)
# One command per line: under `set -e` a failure inside an `a && b` list does
# not stop the script, which would let a lint or type error pass.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (schemas, pipelines, services, circuitscan)"
.venv/bin/mypy schemas pipelines services circuitscan
echo "== pytest"
set +e
.venv/bin/pytest -q -ra --durations=15 "$@"
rc=$?
set -e
echo "== test suite took $(( $(date +%s) - start )) s"
exit $rc
