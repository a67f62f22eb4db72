#!/usr/bin/env bash
# The toy VLM under the recipes of issue 16, scored on a held-out Shapes set drawn with its own seed
# (teacher 99.56 %). Each run of $RUNS is ratio:placement:stage:steps[:train]: placement even or auto
# (measured sensitivity, `convert --placement auto`) or gapN (auto with `--placement-gap N`), stage e2e
# (single stage) or both (90 align steps first), train e.g. mamba+mlp. The demo's settings otherwise:
# batch 8, lr 3e-3, alpha 0.02, template plain. Runs on a CPU; skips what exists.
#
#   W=runs/toy-stages bash scripts/toy-stages.sh
#   W=runs/toy-stages RUNS="0.5:even:e2e:900 0.5:auto:e2e:900 0.5:even:e2e:900:mamba+mlp" bash scripts/toy-stages.sh
set -euo pipefail
W=${W:-runs/toy-stages}
RUNS=${RUNS:-"0.25:even:e2e:450 0.25:even:both:450 0.5:even:e2e:450 0.5:even:both:450"}
ALIGN=${ALIGN:-90}
M=${MATVLM:-matvlm}
T=$(python3 -c "from matvlm.toy.demo import ASSET; print(ASSET)")
mkdir -p "$W"
[ -f "$W/data/train.json" ] || $M toy data --out "$W/data" --n 1000 --n-test 1 --seed 1000 --questions-per-image 6
[ -f "$W/heldout/test.json" ] || $M toy data --out "$W/heldout" --n 1 --n-test 150 --seed 98765 --questions-per-image 6
[ -f "$W/teacher.json" ] || $M eval "$T" --benchmark shapes --data "$W/heldout" --output "$W/teacher.json"
for spec in $RUNS; do
  IFS=: read -r r place stage steps train <<< "$spec"
  train=${train:-mamba,connector}
  tag=h$(python3 -c "print(f'{$r * 100:g}')")
  [[ "$place" =~ ^(even|auto|gap[0-9]+)$ ]] || { echo "placement must be even, auto or gapN, got $place" >&2; exit 2; }
  gap=(); [ "$place" = even ] || tag="$tag-$place"
  [[ "$place" == gap* ]] && gap=(--placement-gap "${place#gap}")
  if [ ! -d "$W/$tag" ]; then
    if [ "$place" != even ]; then
      $M convert "$T" "$W/$tag" --mamba-ratio "$r" --placement auto --data "$W/data/train.json" --template plain "${gap[@]}"
    else
      $M convert "$T" "$W/$tag" --mamba-ratio "$r"
    fi
  fi
  run="$W/$tag-$stage-$steps"; [ "$train" = mamba,connector ] || run="$run-${train//[+,]/-}"
  extra=(); [ "$stage" = both ] && extra=(--align-steps "$ALIGN")
  [ -f "$run/config.json" ] || { rm -rf "$run"; $M distill --teacher "$T" --student "$W/$tag" \
      --data "$W/data/train.json" --out "$run" --stage "$stage" "${extra[@]}" --max-steps "$steps" \
      --train "${train//+/,}" --global-batch-size 8 --micro-batch-size 8 --lr 3e-3 --alpha 0.02 --template plain \
      --save-every 100000 --no-tensorboard; }
  [ -f "$run.json" ] || $M eval "$run" --benchmark shapes --data "$W/heldout" --output "$run.json"
done
python3 - "$W" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
t = json.loads((w / "teacher.json").read_text())["metrics"]["accuracy"]
print(f"teacher {t:.2f}")
for f in sorted(w.glob("h*-*.json")):
    a = json.loads(f.read_text())["metrics"]["accuracy"]
    print(f"{f.stem:28s} {a:6.2f}  kept {a / t:.1%}")
PY
