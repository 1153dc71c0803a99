#!/bin/bash
# $1 = method (lora | full). Train, then score the selected epoch on the test set with the paper's decoding.
m=$1
export OMP_NUM_THREADS=1
.venv/bin/python -m lorakit train --task e2e --preset demo --method $m --epochs 2 --max-train-examples 6000 \
  --max-eval-examples 200 --precision auto --prompt-format plain --lr-scheduler legacy_linear --save-every 250 --out runs/e2e-$m || exit 1
w=runs/e2e-$m/seed0/adapter; [ -d $w ] || w=runs/e2e-$m/seed0
.venv/bin/python -m lorakit eval --adapter $w --split test --precision auto --batch-size 8 --out runs/e2e-$m/test-paper
