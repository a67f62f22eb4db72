#!/usr/bin/env bash
# The staged recipe on the toy VLM (issue 16): the demo's budget (450 steps of 8 samples, lr 3e-3,
# alpha 0.02) single-stage (e2e) against --stage both (90 align steps, then e2e), at 25 % and 50 % Mamba,
# scored on a held-out Shapes set drawn with its own seed. Runs on a CPU; skips what exists.
#
#   W=runs/toy-stages RATIOS="0.25 0.5" STAGES="e2e both" bash scripts/toy-stages.sh
set -euo pipefail
W=${W:-runs/toy-stages}
RATIOS=${RATIOS:-"0.25 0.5"}
STAGES=${STAGES:-"e2e both"}
ALIGN=${ALIGN:-90}
M=${MATVLM:-matvlm}
T=$(python3 -c "from matvlm.toy.demo import ASSET; print(ASSET)")
mkdir -p "$W"
[ -f "$W/data/train.json" ] || $M toy data --out "$W/data" --n 1000 --n-test 1 --seed 1000 --questions-per-image 6
[ -f "$W/heldout/test.json" ] || $M toy data --out "$W/heldout" --n 1 --n-test 150 --seed 98765 --questions-per-image 6
[ -f "$W/teacher.json" ] || $M eval "$T" --benchmark shapes --data "$W/heldout" --output "$W/teacher.json"
for r in $RATIOS; do
  tag=h$(python3 -c "print(f'{$r * 100:g}')")
  [ -d "$W/$tag" ] || $M convert "$T" "$W/$tag" --mamba-ratio "$r"
  for stage in $STAGES; do
    run="$W/$tag-$stage"
    extra=(); [ "$stage" = both ] && extra=(--align-steps "$ALIGN")
    [ -f "$run/config.json" ] || { rm -rf "$run"; $M distill --teacher "$T" --student "$W/$tag" \
        --data "$W/data/train.json" --out "$run" --stage "$stage" "${extra[@]}" --max-steps 450 \
        --global-batch-size 8 --micro-batch-size 8 --lr 3e-3 --alpha 0.02 --template plain --save-every 100000 \
        --no-tensorboard; }
    [ -f "$W/$tag-$stage.json" ] || $M eval "$run" --benchmark shapes --data "$W/heldout" --output "$W/$tag-$stage.json"
  done
done
python3 - "$W" <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
t = json.loads((w / "teacher.json").read_text())["metrics"]["accuracy"]
print(f"teacher {t:.2f}")
for f in sorted(w.glob("h*-*.json")):
    a = json.loads(f.read_text())["metrics"]["accuracy"]
    print(f"{f.stem:12s} {a:6.2f}  kept {a / t:.1%}")
PY
