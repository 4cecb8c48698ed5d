#!/usr/bin/env bash
# The README's main command: set up, then run the end-to-end job on the
# embedded defaults (default model and SAEs, local Ray, local store).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/circuitscan demo "$@"
