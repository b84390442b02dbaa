#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite, the real-model tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${HYLORADA_VENV:-.venv}
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
