#!/bin/bash
# $1 = fp | nf4: the 1,500-step E2E recipe of docs/RESULTS.md (scripts/e2e_main.sh lora), then test decoding with beam 10.
q=$1; extra=""; [ "$q" = nf4 ] && extra="--quantize-base nf4"
export OMP_NUM_THREADS=1
cd /work/main
out=/work/runs/e2e-1500-$q
.venv/bin/python -m lorakit train --task e2e --preset demo --method lora --epochs 2 --max-train-examples 6000 \
  --max-eval-examples 200 --precision auto --prompt-format plain --save-every 250 $extra --out $out $RESUME || exit 1
w=$out/seed0/adapter; [ -d $w ] || w=$out/seed0
.venv/bin/python -m lorakit eval --adapter $w --split test --precision auto --batch-size 8 --out $out/test-paper
