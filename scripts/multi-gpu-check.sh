#!/usr/bin/env bash
# The real `matvlm distill` loop on the shipped toy teacher, 1 process vs 2 processes under each
# shipped accelerate config (DDP, FSDP, DeepSpeed ZeRO-2): same global batch, same data order, so
# the loss curves should agree up to bf16 and reduction-order rounding. Needs 2 GPUs; ZeRO-2
# needs deepspeed. Writes $W/<variant>/log.jsonl and prints a summary; then each run's saved model
# is loaded again and scored on held-out Shapes-VQA questions (the FSDP and ZeRO-2 saves included).
#
#   W=runs/mgpu STEPS=30 bash scripts/multi-gpu-check.sh
set -uo pipefail
W=${W:-runs/mgpu}; STEPS=${STEPS:-30}
VARIANTS=${VARIANTS:-"one ddp fsdp zero2"}
MATVLM=${MATVLM:-"python3 -m matvlm"}
TEACHER=$(python3 -c "from matvlm.toy.demo import ASSET; print(ASSET)")
mkdir -p "$W"
[ -f "$W/shapes/train.json" ] || $MATVLM toy data --out "$W/shapes" --n 1024 --n-test 40 > /dev/null
ARGS=(--teacher "$TEACHER" --mamba-ratio 0.25 --data "$W/shapes/train.json" --max-steps "$STEPS"
      --global-batch-size 32 --micro-batch-size 8 --lr 3e-3 --alpha 0.02 --save-every 100000 --no-tensorboard)
for v in $VARIANTS; do
  rm -rf "${W:?}/$v"
  start=$(date +%s)
  if [ "$v" = one ]; then
    CUDA_VISIBLE_DEVICES=0 $MATVLM distill "${ARGS[@]}" --out "$W/$v" > "$W/$v.log" 2>&1
  else
    accelerate launch --config_file "matvlm/recipes/$v.yaml" --num_processes 2 -m matvlm distill "${ARGS[@]}" \
      --out "$W/$v" > "$W/$v.log" 2>&1
  fi
  echo "$v: exit $? in $(( $(date +%s) - start )) s"
  [ -f "$W/$v/config.json" ] && CUDA_VISIBLE_DEVICES=0 $MATVLM eval "$W/$v" --benchmark shapes --data "$W/shapes" \
      --output "$W/$v.eval.json" > "$W/$v.eval.log" 2>&1
done
python3 - "$W" $VARIANTS <<'PY'
import json, sys, pathlib
w = pathlib.Path(sys.argv[1])
print(f"{'variant':<8}{'steps':>6}{'loss@1':>10}{'loss@10':>10}{'loss@last':>11}{'KL@last':>9}{'s/step (2..last)':>18}"
      f"{'saved model, Shapes acc':>25}")
for v in sys.argv[2:]:
    p = w / v / "log.jsonl"
    if not p.is_file():
        print(f"{v:<8} no log"); continue
    L = [json.loads(x) for x in p.read_text().splitlines()]
    per = (L[-1]["elapsed_s"] - L[0]["elapsed_s"]) / max(1, len(L) - 1)
    ev = w / f"{v}.eval.json"
    acc = f"{json.loads(ev.read_text())['metrics']['accuracy']:.1f} %" if ev.is_file() else "not scored"
    print(f"{v:<8}{len(L):>6}{L[0]['loss']:>10.4f}{L[min(9, len(L) - 1)]['loss']:>10.4f}{L[-1]['loss']:>11.4f}"
          f"{L[-1]['loss_prob']:>9.4f}{per:>18.3f}  {acc}")
PY
