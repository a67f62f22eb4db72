#!/usr/bin/env bash
# Distillation speed of a small text model on one GPU (issue 16): the step alone at several micro-batch
# sizes with a kernel profile (scripts/profile-distill-step.py), then the whole `matvlm distill` loop
# (data loading, tokenising, host syncs, logging included), with and without --group-by-length, on
# random-weight SmolLM2 shapes and random text, read from its log.jsonl.
#
#   CFG=dir-with-config-and-tokenizer OUT=results/ [COMPILE=norm,mlp | COMPILE=layer] [PROFILE=0] \
#       [LOOPS="plain group"] bash scripts/distill-speed.sh
set -euo pipefail
CFG=${CFG:?a causal-LM directory with config.json and tokenizer files}
OUT=${OUT:-runs/distill-speed}
W=${W:-/tmp/distill-speed}
PY=${PY:-python3}
MICRO=${MICRO:-16,32,64}
mkdir -p "$OUT" "$W"
# PROFILE=0: the loops alone
[ "${PROFILE:-1}" = 0 ] || PYTHONUNBUFFERED=1 $PY scripts/profile-distill-step.py --config "$CFG" --micro "$MICRO" --out "$OUT"
# COMPILE=norm,mlp or layer: the same step with those submodules under torch.compile, side by side (its own folder)
[ -z "${COMPILE:-}" ] || [ "${PROFILE:-1}" = 0 ] || PYTHONUNBUFFERED=1 $PY scripts/profile-distill-step.py --config "$CFG" --micro "$MICRO" \
    --compile "$COMPILE" --out "$OUT/compiled"

# the loop: a random-weight model directory with the real tokenizer, and random text of ~1 000 tokens a line
$PY - "$CFG" "$W" <<'PY'
import json, random, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
cfg_dir, w = Path(sys.argv[1]), Path(sys.argv[2])
if not (w / "model" / "config.json").exists():
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg_dir)).to(torch.bfloat16)
    m.save_pretrained(w / "model")
    for f in cfg_dir.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, w / "model" / f.name)
rng = random.Random(0)
words = [l.strip() for l in open("/usr/share/dict/words")] if Path("/usr/share/dict/words").exists() else \
    ["the", "of", "and", "model", "state", "layer", "token", "value", "time", "space", "river", "stone"]
with open(w / "text.jsonl", "w") as f:
    for _ in range(1200):
        f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(300, 900)))}) + "\n")
PY
# LOOPS: which loops to time, "plain", "group" (--group-by-length) and/or "compile" (--compile: attention layers
# compiled whole, Mamba layers' norms and MLPs, dynamic shapes), or both ("compile-group"); a name with "tokens"
# also cuts micro-batches by positions (--micro-batch-tokens ${MBT:-65536}); each read from its log.jsonl (its
# second half: compilation comes first)
for loop in ${LOOPS:-plain group}; do
  rm -rf "$W/run"
  $PY -m matvlm distill --teacher "$W/model" --mamba-ratio 0.25 --data "$W/text.jsonl" --out "$W/run" \
      --max-steps ${STEPS:-16} --global-batch-size ${GB:-64} --micro-batch-size ${MB:-32} --max-length 1024 \
      --alpha 0.01 --lr 1e-3 --save-every 100000 --no-tensorboard $([[ "$loop" == *group* ]] && echo --group-by-length) $([[ "$loop" == *compile* ]] && echo --compile) \
      $([[ "$loop" == *tokens* ]] && echo --micro-batch-tokens ${MBT:-65536}) \
      2>&1 | tail -3
  cp "$W/run/log.jsonl" "$OUT/loop-$loop-log.jsonl"
  $PY - "$W/run/log.jsonl" "$loop" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
k = len(recs) // 2                               # skip the first half (Triton compiling and autotuning)
toks = sum(r["tokens"] for r in recs[k:])
secs = recs[-1]["elapsed_s"] - recs[k - 1]["elapsed_s"]
print(json.dumps({"loop": sys.argv[2], "loop_steps_timed": len(recs) - k, "loop_tokens_per_s": toks / secs}))
PY
done
