#!/usr/bin/env bash
# The GPU measurements issues 16 and 20 still wait for, in order of need, as one detached job on a lent GPU
# (about 20 minutes on an H100; steps whose result exists in $R are skipped, so a cut job continues):
#   1. serve-check: the continuous batcher's logits on the greedy serving path against a full forward, sharing
#      slots and alone (6 and 12 requests, float32, and without PDL): issue 20 item 2's correctness;
#   2. on an H200 only: the decode step's variants (hybrid and teacher; issue 20 item 3), the prefill probe and
#      the 75 % hybrid's time to first token at 16K (item 4);
#   3. the `matvlm distill --compile --group-by-length` loop on SmolLM2 shapes, this checkout and the files of
#      .carry/base (scripts/device-prep.sh BASE=...), then the step alone of each with the host's issue time
#      (issue 16 item 5);
#   4. the ragged split-KV attention probe, and serving under load with PDL (scripts/serve-bench.sh's tail4).
# Prepare with scripts/device-prep.sh, then on the device (carry .whl .whl2 .carry):
#   pip install --no-index --no-deps --no-compile -q --target /tmp/site .whl/*.whl
#   pip install --no-index --no-deps --no-compile -q --target /tmp/site2 .whl2/*.whl
#   cp -r . /tmp/repo; (setsid nohup bash /tmp/repo/scripts/gpu-checks.sh > /tmp/gpu-checks.log 2>&1 &)
# and collect $R (default /tmp/res) with tar while it runs; /tmp/phaseA.done, /tmp/phaseB.done and
# /tmp/all.done mark the ends of steps 1-2, 3's loops and everything. A serve-check that failed (rc != 0) is
# kept as serve-check-NAME.failed and run again by a resumed job.
set -uo pipefail
R=${R:-/tmp/res}; SITE=${SITE:-/tmp/site}; SITE2=${SITE2:-/tmp/site2}
REPO=$(cd "$(dirname "$0")/.." && pwd); cd "$REPO"
mkdir -p "$R"
export PYTHONPATH=$SITE:$REPO PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
MATVLM="python3 -m matvlm"
step() { echo "=== $(date -u +%T) $*"; }
[ -f "$R/gpu.txt" ] || { nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
} > "$R/gpu.txt"
H200=0; grep -q H200 "$R/gpu.txt" && H200=1
W=${W:-/tmp/serve-bench}; mkdir -p "$W"
step model
[ -f "$W/rtl/config.json" ] || python3 scripts/random-tinyllava.py --tokenizer .carry/smolcfg --out "$W/rtl" > "$R/model.log" 2>&1
[ -f "$W/rtl-h25/config.json" ] || $MATVLM convert "$W/rtl" "$W/rtl-h25" --mamba-ratio 0.25 >> "$R/model.log" 2>&1
sc() { local name=$1 rc; shift; [ -f "$R/serve-check-$name.txt" ] && return; step serve-check "$name"
  python3 scripts/serve-check.py "$W/rtl-h25" "$@" > "$R/serve-check-$name.tmp" 2>&1; rc=$?
  echo "rc=$rc" >> "$R/serve-check-$name.tmp"
  if [ $rc = 0 ]; then mv "$R/serve-check-$name.tmp" "$R/serve-check-$name.txt"
  else mv "$R/serve-check-$name.tmp" "$R/serve-check-$name.failed"; fi; }
sc 6 --requests 6
sc f32 --requests 6 --dtype float32
sc 12 --requests 12
(export MATVLM_PDL=0; sc 12-nopdl --requests 12)
if [ $H200 = 1 ]; then
  mkdir -p "$R/variants" "$R/prefill" "$R/bench"
  [ -f "$R/variants/variants.json" ] || { step variants hybrid
    python3 scripts/decode-variants-probe.py --out "$R/variants" --rounds 1 > "$R/variants/h25.log" 2>&1; }
  [ -f "$R/variants/teacher/variants.json" ] || { step variants teacher
    python3 scripts/decode-variants-probe.py --out "$R/variants/teacher" --spec random:tinyllava-phi2 --rounds 1 \
      > "$R/variants/teacher.log" 2>&1; }
  [ -f "$R/prefill/prefill-probe.json" ] || { step prefill
    PYTHONPATH=$SITE2:$PYTHONPATH python3 scripts/prefill-probe.py --out "$R/prefill" > "$R/prefill/log" 2>&1; }
  [ -d "$R/bench/h75" ] || { step bench h75
    $MATVLM bench random:tinyllava-phi2@0.75 --vs random:tinyllava-phi2 --context 16k --batch 1 --gen 32 --no-hf \
      --out "$R/bench/h75" > "$R/bench/h75.log" 2>&1; }
fi
touch /tmp/phaseA.done
loop() { local tree=$1 tag=$2; shift 2; [ -f "$R/distill-$tag/loop-compile-group-log.jsonl" ] && return
  step distill "$tag"
  (cd "$tree" && env PYTHONPATH="$SITE:$tree" CFG="$REPO/.carry/smolcfg" OUT="$R/distill-$tag" W=/tmp/distill-speed \
     PROFILE=0 LOOPS=compile-group MB=64 GB=128 STEPS=${STEPS:-40} "$@" bash scripts/distill-speed.sh \
     > "$R/distill-$tag.log" 2>&1); }
loop "$REPO" this
BASE_TAG=base-$(cat .carry/base/COMMIT 2>/dev/null || echo unknown)
if [ -f .carry/base/train.py ]; then
  rm -rf /tmp/base-tree; cp -r "$REPO" /tmp/base-tree; cp .carry/base/*.py /tmp/base-tree/matvlm/distill/
  loop /tmp/base-tree "$BASE_TAG"
fi
touch /tmp/phaseB.done
prof() { local tree=$1 tag=$2; [ -f "$R/step-$tag/profile-distill-step.json" ] && return; step step-profile "$tag"
  (cd "$tree" && PYTHONPATH="$SITE:$tree" python3 scripts/profile-distill-step.py --config "$REPO/.carry/smolcfg" \
     --micro 16,64 --compile layer --out "$R/step-$tag" > "$R/step-$tag.log" 2>&1); }
prof "$REPO" this
[ -f .carry/base/train.py ] && prof /tmp/base-tree "$BASE_TAG"
[ -f "$R/ragged/ragged-attention.json" ] || { step ragged
  python3 scripts/ragged-attention-probe.py --out "$R/ragged" > "$R/ragged.log" 2>&1; }
step serving
OUT="$R/serve" TOK=.carry/smolcfg W="$W" LOADS="0:16:1024:tail4:log-uniform" REQUESTS=64 WARMUP=32 \
  SCHEDULERS=static,continuous,overlap MATVLM="$MATVLM" bash scripts/serve-bench.sh > "$R/serve.log" 2>&1
step done
touch /tmp/all.done
