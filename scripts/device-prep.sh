#!/usr/bin/env bash
# Prepares, on a development machine with the README's install, what scripts/gpu-checks.sh needs on a lent GPU
# machine that has torch, transformers, triton and accelerate but no internet (git-ignored through
# .git/info/exclude):
#   .whl/             the serving stack (fastapi, uvicorn and what they import) as Python 3.12 wheels;
#   .whl2/            fla-core, the reference chunk kernel scripts/prefill-probe.py times beside matvlm's;
#   .carry/smolcfg/   SmolLM2-135M-Instruct's config and tokenizer, no weights (from the packaged GGUF);
#   .carry/base/      matvlm/distill/{train,model,losses}.py of $BASE, to time the distillation loop before
#                     and after, side by side (empty BASE: none).
#
#   BASE=c718841 bash scripts/device-prep.sh
# Then carry .whl, .whl2 and .carry in the device call (scripts/gpu-checks.sh says how to start it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
EXCLUDE=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || printf '/.whl/\n/.whl2/\n/.carry/\n' >> "$EXCLUDE"
D=($PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
   --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl .whl2 .carry/smolcfg
"${D[@]}" -d .whl "fastapi==$(ver fastapi)" "uvicorn==$(ver uvicorn)" "starlette==$(ver starlette)" \
    "pydantic==$(ver pydantic)" "pydantic_core==$(ver pydantic_core)" "typing_extensions==$(ver typing_extensions)" \
    annotated-types typing-inspection opentelemetry-api importlib-metadata
"${D[@]}" -d .whl2 "fla-core==${FLA:-0.6.0}"
if [ ! -f .carry/smolcfg/tokenizer.json ]; then
  tmp=$(mktemp -d)
  HF_HUB_OFFLINE=1 $PY -m matvlm import-gguf --out "$tmp/smol" > "$tmp/log" 2>&1 || { cat "$tmp/log"; exit 1; }
  find "$tmp/smol" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .carry/smolcfg/ \;
  rm -rf "$tmp"
fi
rm -rf .carry/base
if [ -n "${BASE:-}" ]; then
  rm -rf .carry/base.tmp; mkdir -p .carry/base.tmp
  for f in train.py model.py losses.py; do git show "$BASE:matvlm/distill/$f" > ".carry/base.tmp/$f"; done
  echo "$BASE" > .carry/base.tmp/COMMIT
  mv .carry/base.tmp .carry/base
fi
du -sh .whl .whl2 .carry
