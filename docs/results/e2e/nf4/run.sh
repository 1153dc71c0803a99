#!/bin/bash
# $1 = fp | nf4: the 1,500-step E2E recipe of docs/RESULTS.md (scripts/e2e_main.sh lora), then test decoding with beam 10.
# RESUME=--resume continues a run from its last --save-every checkpoint.
q=$1; extra=""; [ "$q" = nf4 ] && extra="--quantize-base nf4"
export OMP_NUM_THREADS=1
cd "$(git rev-parse --show-toplevel)" || exit 1
out=runs/e2e-1500-$q
python -m lorakit train --task e2e --preset demo --method lora --epochs 2 --max-train-examples 6000 \
  --max-eval-examples 200 --precision auto --prompt-format plain --save-every 250 $extra --out $out $RESUME || exit 1
w=$out/seed0/adapter; [ -d $w ] || w=$out/seed0
python -m lorakit eval --adapter $w --split test --precision auto --batch-size 8 --out $out/test-paper
