#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded default: SmolLM2-135M and the
# offline KJV / Shakespeare texts.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${HYLORADA_VENV:-.venv}
exec "$VENV/bin/hylorada" benchmark "$@"
