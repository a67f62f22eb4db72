#!/usr/bin/env bash
# Serving under load at TinyLLaVA-3.1B size (issue 20): a random-weight VLM at TinyLLaVA's shapes with a local
# tokenizer (scripts/random-tinyllava.py), converted to 25 % Mamba, then `matvlm bench-serve` (static against
# continuous batching, same workload, warmed up first) for each workload of $LOADS (rate:low:high:name[:dist];
# rate 0 sends every request at once; dist is how answer lengths are drawn from low..high: uniform, the default,
# or log-uniform, a long tail). Results in $OUT/<name>/bench-serve.{json,md,png}.
#
#   TOK=dir-with-tokenizer OUT=results/serve bash scripts/serve-bench.sh
#   TOK=... LOADS="0:16:512:sat 8:16:512:r8" REQUESTS=128 MAX_BATCH=16 bash scripts/serve-bench.sh
#   SMALL=1 (tiny widths, same layout: a CPU trial of the pipeline); PREFILL=2048: the continuous batcher's
#   --prefill-tokens (default 1024); SCHEDULERS=static,continuous,overlap: bench-serve's --scheduler (default
#   static,continuous; overlap is continuous with --overlap-prefill)
set -euo pipefail
TOK=${TOK:?a local directory with tokenizer files (e.g. an import-gguf output)}
OUT=${OUT:-runs/serve-bench}
W=${W:-/tmp/serve-bench}
PY=${PY:-python3}
MATVLM=${MATVLM:-matvlm}
LOADS=${LOADS:-"0:16:512:sat 10:16:512:r10 0:16:128:short"}
REQUESTS=${REQUESTS:-128}
MAX_BATCH=${MAX_BATCH:-16}
MAX_LEN=${MAX_LEN:-4096}
mkdir -p "$OUT" "$W"
[ -f "$W/rtl/config.json" ] || $PY scripts/random-tinyllava.py --tokenizer "$TOK" --out "$W/rtl" ${SMALL:+--small}
[ -f "$W/rtl-h25/config.json" ] || $MATVLM convert "$W/rtl" "$W/rtl-h25" --mamba-ratio 0.25
for load in $LOADS; do
  IFS=: read -r rate lo hi name dist <<< "$load"
  [ -f "$OUT/$name/bench-serve.json" ] && continue
  $MATVLM bench-serve "$W/rtl-h25" --requests "$REQUESTS" --rate "$rate" --max-tokens "$lo:$hi" \
      --prompt-words 16:256 --answer-lengths "${dist:-uniform}" --max-batch "$MAX_BATCH" --max-len "$MAX_LEN" \
      --warmup "${WARMUP:-32}" --out "$OUT/$name" \
      ${PREFILL:+--prefill-tokens "$PREFILL"} ${SCHEDULERS:+--scheduler "$SCHEDULERS"}
done
