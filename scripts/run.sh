#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the main job on the embedded default: SmolLM2-135M and the
# offline Shakespeare text. `hylorada benchmark` runs its default preset `quick`: compress 20%
# (whitened SVD), recover, adapt with LoRA and HyLoRADA, print the size/perplexity table and a
# sample generation, write runs/benchmark-quick/ with the plots (a few minutes on 2 CPU cores,
# README "Set-up"). Arguments are passed on: `bash scripts/run.sh --preset cpu-quick` (~15 min).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${HYLORADA_VENV:-.venv}
exec "$VENV/bin/hylorada" benchmark "$@"
