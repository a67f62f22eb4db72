#!/usr/bin/env bash
# SmolLM2-135M-Instruct distilled on general text the teacher writes itself, scored on natural human-written
# text (issue 16): the run behind docs/results.md ("Keeping what the teacher knows on natural text").
#
#   1. import the packaged GGUF (or $GGUF);
#   2. held-out sets: natural text (scripts/natural-text.py: Python docs + licence texts, never trained on)
#      and the teacher's greedy answers to held-out chat prompts;
#   3. training data: `self-generate --kind text` ($TOKENS tokens: sampled continuations from the document
#      start and from seeds, chats; long sequences);
#   4. per run of $RUNS (ratio:placement:stage[:train[:opts]]; placement even or auto = by measured
#      sensitivity, stage e2e = single stage or both = align then e2e, train = the parameter groups that
#      train, joined by '+', default mamba; opts joined by '+': group = --group-by-length, gapN = auto
#      placement with Mamba layers at least N apart (--placement-gap), seedN = distil with --seed N (another
#      data order: a second seed of the same student), op = a second, on-policy round, cont =
#      its control; default every $RATIOS x $STAGES, even): convert, distil $STEPS steps, score with eval-lm
#      on both held-out sets;
#   5. op: the distilled student answers $OP_PROMPTS synthetic training prompts greedily (its own outputs,
#      loops included: the teacher's KL on them is what corrects a loop), and distillation goes on from the
#      student for $OP_STEPS end-to-end steps on those answers mixed with the general text (RUN-op); cont:
#      the same steps on the general text alone (RUN-cont), so that the gain of the student's own data is
#      measured apart from the gain of more steps. Give both in one spec (gap3+op+cont: the rounds run in
#      order after the base run); specs in other lanes must not share a base run that is still training.
# Every stage is skipped when its output exists and distillation resumes from its checkpoints, so a run
# cut by a time limit continues where it stopped when started again.
#
#   W=runs/smollm2g TOKENS=3000000 STEPS=240 RATIOS="0.25 0.5 0.75" STAGES="both e2e" bash scripts/smollm2-general.sh
#   W=runs/smollm2g RUNS="0.5:even:both 0.5:auto:both 0.5:even:both:mamba+mlp" bash scripts/smollm2-general.sh
set -euo pipefail
W=${W:-runs/smollm2g}
OUT=${OUT:-$W/results}
TOKENS=${TOKENS:-3000000}       # general-text training tokens to generate
STEPS=${STEPS:-240}             # optimizer steps per run
GB=${GB:-32}                    # global batch (sequences)
MB=${MB:-16}                    # micro-batch
MAXLEN=${MAXLEN:-1024}
LR=${LR:-1e-3}
ALIGN=${ALIGN:-40}              # align steps of --stage both
RATIOS=${RATIOS:-"0.25"}
STAGES=${STAGES:-"both e2e"}
MATVLM=${MATVLM:-matvlm}
PY=${PY:-python3}
mkdir -p "$W" "$OUT"
t() { echo "[$(date +%T)] $*"; }

[ -d "$W/smollm2" ] || { t import; $MATVLM import-gguf --out "$W/smollm2" ${GGUF:+--gguf "$GGUF"}; }
[ -f "$W/natural.jsonl" ] || $PY scripts/natural-text.py "$W/natural.jsonl"
[ -f "$W/heldout.jsonl" ] || { t heldout; $MATVLM self-generate "$W/smollm2" --prompts "synthetic-heldout:${N_HELD:-200}" \
    --out "$W/heldout.jsonl" --batch-size 64; }
[ -f "$W/general.jsonl" ] || { t general; $MATVLM self-generate "$W/smollm2" --kind text --tokens "$TOKENS" \
    --out "$W/general.jsonl" --batch-size "${GEN_BATCH:-256}" --max-new-tokens "$MAXLEN"; }
cp "$W/general.jsonl.meta.json" "$OUT/general-meta.json"

# RUNS: ratio:placement:stage[:train[:opts]] (placement even or auto; stage both or e2e; train e.g. mamba+mlp;
# opts e.g. group),
# run in the order given
RUNS=${RUNS:-$(for r in $RATIOS; do for s in $STAGES; do printf '%s:even:%s ' "$r" "$s"; done; done)}

# train_into DIR FLAGS...: distil into DIR with the recipe's common settings and FLAGS; skipped once DIR is
# finished, resumed from its checkpoints when a run was cut
train_into() {
  local out=$1; shift
  [ -f "$out/config.json" ] && return 0
  t "distill $(basename "$out")"
  if [ -f "$out/distill_config.json" ]; then
    $MATVLM distill --resume "$out"
  else
    $MATVLM distill --teacher "$W/smollm2" --out "$out" "$@" --global-batch-size "$GB" --micro-batch-size "$MB" \
      --alpha 0.01 --max-length "$MAXLEN" --save-every 20 --keep-last 1 --no-tensorboard
  fi
}

# score DIR: its log and eval-lm on both held-out sets, as $OUT/NAME-{log.jsonl,natural.json,heldout.json,...}
score() {
  local run=$1 name set
  name=$(basename "$run")
  cp "$run/log.jsonl" "$OUT/$name-log.jsonl"
  for set in natural heldout; do
    [ -f "$OUT/$name-$set.json" ] || { t "eval $name $set"; $MATVLM eval-lm "$run" --teacher "$W/smollm2" \
        --data "$W/$set.jsonl" --max-length "$MAXLEN" --batch-size 16 ${LIMIT:+--limit "$LIMIT"} \
        --output "$OUT/$name-$set.json" > "$OUT/$name-$set.txt"; }
  done
}

one_run() {
  local spec=$1 r place stage train opts gap tag scores layers run extra name seed
  IFS=: read -r r place stage train opts <<< "$spec"
  local o
  for o in ${opts//+/ }; do
    [[ "$o" =~ ^(group|op|cont|gap[0-9]+|seed[0-9]+)$ ]] || { echo "unknown option '$o' in $spec (expected group, op, cont, gapN, seedN)" >&2; return 2; }
  done
  train=${train:-mamba}
  gap=$(echo "+${opts:-}+" | sed -n 's/.*+gap\([0-9]*\)+.*/\1/p'); gap=${gap:-1}
  tag=h$($PY -c "print(f'{$r * 100:g}'.replace('.', 'p'))")
  [ "$place" = auto ] && tag="$tag-auto"
  [ "$gap" = 1 ] || tag="$tag-gap$gap"
  { flock 9                                            # lanes that share a student convert it once
  if [ ! -d "$W/$tag" ]; then
    t "convert $tag"
    scores=$(ls "$W"/h*-auto/placement.json 2>/dev/null | head -1 || true)
    if [ "$place" = auto ] && [ -n "$scores" ]; then     # the scores do not depend on the ratio: choose from them
      layers=$($PY -c "import json,sys; from matvlm.distill.placement import choose; \
print(','.join(map(str, choose(json.load(open(sys.argv[1]))['scores'], $r, $gap))))" "$scores")
      $MATVLM convert "$W/smollm2" "$W/$tag" --mamba-layers "$layers"
      cp "$scores" "$W/$tag/placement.json"
    elif [ "$place" = auto ]; then
      $MATVLM convert "$W/smollm2" "$W/$tag" --mamba-ratio "$r" --placement auto --data "$W/general.jsonl" \
          --placement-steps "${PLACEMENT_STEPS:-100}" --placement-gap "$gap"
    else
      $MATVLM convert "$W/smollm2" "$W/$tag" --mamba-ratio "$r"
    fi
  fi
  } 9>"$W/.convert.lock"
  [ -f "$W/$tag/placement.json" ] && cp "$W/$tag/placement.json" "$OUT/$tag-placement.json"
  run="$W/$tag-$stage"; [ "$train" = mamba ] || run="$run-${train//+/-}"
  extra=(); [ "$stage" = both ] && extra=(--align-steps "$ALIGN")
  case "+${opts:-}+" in *+group+*) extra+=(--group-by-length); run="$run-group";; esac
  seed=$(echo "+${opts:-}+" | sed -n 's/.*+seed\([0-9]*\)+.*/\1/p')
  [ -z "$seed" ] || { extra+=(--seed "$seed"); run="$run-seed$seed"; }
  train_into "$run" --student "$W/$tag" --data "$W/general.jsonl" --stage "$stage" "${extra[@]}" \
      --train "${train//+/,}" --max-steps "$STEPS" --lr "$LR"
  score "$run"
  name=$(basename "$run")
  local round data
  for round in op cont; do
    case "+${opts:-}+" in *+$round+*) ;; *) continue;; esac
    data="$W/general.jsonl"
    if [ $round = op ]; then
      [ -f "$W/$name-answers.jsonl" ] || { t "on-policy answers $name"; $MATVLM self-generate "$run" \
          --prompts "synthetic:${OP_PROMPTS:-1500}" --out "$W/$name-answers.jsonl" --batch-size 256 --max-new-tokens 512; }
      data="$W/$name-op-data.jsonl"
      [ -f "$data" ] || { cat "$W/general.jsonl" "$W/$name-answers.jsonl" > "$data.tmp" && mv "$data.tmp" "$data"; }
      cp "$W/$name-answers.jsonl.meta.json" "$OUT/$name-answers-meta.json" 2>/dev/null || true
    fi
    train_into "$run-$round" --student "$run" --data "$data" --stage e2e ${seed:+--seed "$seed"} \
        --train "${train//+/,}" --max-steps "${OP_STEPS:-80}" --lr "${OP_LR:-5e-4}"
    score "$run-$round"
  done
}

# LANES > 1 runs the specs in that many concurrent lanes on the one GPU (a 135M model's step leaves most of
# an H200 idle); specs go to lanes round-robin, each lane runs its own in order. Keep auto specs in one lane.
# Memory: one lane at MB=32 x 1024 tokens peaked at 61 GiB, so three such lanes do not fit an 80 GiB H100
# (use LANES=2 MB=16 there).
LANES=${LANES:-1}
specs=($RUNS)
pids=()
for ((lane = 0; lane < LANES; lane++)); do
  (
    failed=0
    for ((k = lane; k < ${#specs[@]}; k += LANES)); do
      # a run that fails (out of memory, say) ends with its error and the lane goes on to its next run
      ( one_run "${specs[k]}" 2>&1 | sed -u "s/^/[lane $lane] /" ) &
      wait $! || { echo "[lane $lane] run ${specs[k]} failed"; failed=1; }
    done
    exit $failed
  ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
t done
exit $status
