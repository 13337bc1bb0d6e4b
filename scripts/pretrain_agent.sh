#!/usr/bin/env bash
# Meta-train the agent shipped in python/dvmrl/pretrained/ and plot its
# learning curve to docs/meta_training_curve.png.
#
# Usage: scripts/pretrain_agent.sh            (fresh run)
#        RESUME=1 scripts/pretrain_agent.sh   (continue an interrupted run)
# Environment: PYTHON (default: .venv/bin/python), WORK (default:
# build/pretrain), EPISODES (default: 400), THREADS (default: 1).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-build/pretrain}
EPISODES=${EPISODES:-400}
THREADS=${THREADS:-1}
export PYTHONPATH=${PYTHONPATH:-python}

resume=()
if [[ "${RESUME:-0}" == 1 ]]; then
  resume=(--resume)
else
  rm -f "$WORK"/agent.pt "$WORK"/agent.buffer.npz "$WORK"/agent.progress.json
fi
mkdir -p "$WORK"

"$PYTHON" -m dvmrl agent train \
  --episodes "$EPISODES" --seed 0 --checkpoint-every 5 \
  --threads "$THREADS" --device cpu \
  --out "$WORK/agent.pt" --curve docs/meta_training_curve.png "${resume[@]}"

"$PYTHON" -c "import sys; from dvmrl.meta import export_pretrained; print(export_pretrained(sys.argv[1]))" "$WORK/agent.pt"
