#!/usr/bin/env bash
# Set up a virtual environment in .venv (or $HYLORADA_VENV): CPU torch 2.13.0 first, then the
# package with its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HYLORADA_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    "$VENV/bin/python" -m pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
fi
"$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import torch, transformers, peft, hylorada; print('torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| hylorada', hylorada.__version__)"
