#!/usr/bin/env bash
# The runs behind docs/RESULTS.md's MiniLM tables: four methods, three seeds, the demo
# recipe shortened to EPOCHS (default 4) for CPU time. TASK defaults to mrpc.
#   TASK=rte bash scripts/results_minilm.sh
# Then the table:  lorakit report runs/results/<task>-*
set -euo pipefail
PY=${PY:-.venv/bin/python}
TASK=${TASK:-mrpc}
EPOCHS=${EPOCHS:-4}
for method in lora full bitfit adapter; do
  "$PY" -m lorakit train --task "$TASK" --method "$method" --seeds 0,1,2 --epochs "$EPOCHS" --lr-scheduler legacy_linear \
    --out "runs/results/$TASK-$method" --no-progress
done
"$PY" -m lorakit report runs/results/"$TASK"-*
