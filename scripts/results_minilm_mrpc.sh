#!/usr/bin/env bash
# The runs behind docs/RESULTS.md's MiniLM rows on MRPC: four methods, three seeds,
# the demo recipe shortened to 4 epochs for CPU time. Then the table:
#   lorakit report runs/results/mrpc-*
set -euo pipefail
PY=${PY:-.venv/bin/python}
EPOCHS=${EPOCHS:-4}
for method in lora full bitfit adapter; do
  "$PY" -m lorakit train --task mrpc --method "$method" --seeds 0,1,2 --epochs "$EPOCHS" \
    --out "runs/results/mrpc-$method" --no-progress
done
"$PY" -m lorakit report runs/results/mrpc-*
