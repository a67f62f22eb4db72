#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end, the run behind docs/results.md ("A real pretrained model"):
# import the packaged GGUF, let the teacher answer 2000 synthetic prompts (training data) and 200
# held-out ones (evaluation data, on topics the training prompts never mention), then for each
# Mamba ratio: convert, score the undistilled hybrid, distil for $STEPS steps, score again.
# Every stage is skipped when its output exists, so a cut run continues where it stopped.
#
#   W=runs/smollm2 STEPS=300 RATIOS="0.25 0.125 0.5" bash scripts/smollm2-results.sh
set -euo pipefail
W=${W:-runs/smollm2}            # work directory
OUT=${OUT:-$W/results}          # eval-lm JSON files
STEPS=${STEPS:-300}             # optimizer steps per ratio (global batch 64)
RATIOS=${RATIOS:-"0.25 0.125 0.5"}
MATVLM=${MATVLM:-matvlm}
mkdir -p "$W" "$OUT"

[ -d "$W/smollm2" ] || $MATVLM import-gguf --out "$W/smollm2" ${GGUF:+--gguf "$GGUF"}
[ -f "$W/train.jsonl" ] || $MATVLM self-generate "$W/smollm2" --prompts "synthetic:${N_TRAIN:-2000}" --out "$W/train.jsonl" --batch-size 64
[ -f "$W/heldout.jsonl" ] || $MATVLM self-generate "$W/smollm2" --prompts "synthetic-heldout:${N_HELD:-200}" --out "$W/heldout.jsonl" --batch-size 64

for r in $RATIOS; do
  tag=h$(python3 -c "print(f'{$r * 100:g}'.replace('.', 'p'))")   # 0.125 -> h12p5
  [ -d "$W/$tag" ] || $MATVLM convert "$W/smollm2" "$W/$tag" --mamba-ratio "$r"
  [ -f "$OUT/$tag-init.json" ] || $MATVLM eval-lm "$W/$tag" --teacher "$W/smollm2" --data "$W/heldout.jsonl" \
      --batch-size 32 --output "$OUT/$tag-init.json" > "$OUT/$tag-init.txt"
  if [ ! -f "$W/$tag-d/config.json" ]; then
    rm -rf "$W/$tag-d"
    $MATVLM distill --teacher "$W/smollm2" --student "$W/$tag" --data "$W/train.jsonl" --out "$W/$tag-d" \
      --max-steps "$STEPS" --global-batch-size "${GB:-64}" --micro-batch-size "${MB:-32}" --lr 1e-3 --alpha 0.01 \
      --max-length 512 --save-every 100000 --no-tensorboard
  fi
  cp "$W/$tag-d/log.jsonl" "$OUT/$tag-log.jsonl"
  [ -f "$OUT/$tag.json" ] || $MATVLM eval-lm "$W/$tag-d" --teacher "$W/smollm2" --data "$W/heldout.jsonl" \
      --batch-size 32 --output "$OUT/$tag.json" > "$OUT/$tag.txt"
done
