"""One cell of `matvlm bench` for transformers generate with the static cache (compiled), alone in a
process (GPU only; prints one JSON line).

    python scripts/hf-static-cell.py [--model random:tinyllava-phi2] [--context 16384] [--batch 8] [--gen 16]

`matvlm bench` runs the static + compiled cells at batch 1 only, after every other cell of the run;
compiling for a larger batch after those did not finish within a device call's time limit. Alone, the
same measurement (`matvlm.bench.speed.hf_cell`) takes about a minute.
"""
import argparse
import json
import time

import torch

from matvlm.bench.speed import Cell, hf_cell, resolve

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--model", default="random:tinyllava-phi2", help="a teacher directory or random spec")
ap.add_argument("--context", type=int, default=16384)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--gen", type=int, default=16)
args = ap.parse_args()
model, _ = resolve(args.model, torch.bfloat16)
vocab = model.get_output_embeddings().out_features
t0 = time.time()
row = hf_cell(model, Cell(args.context, args.batch, args.gen), vocab, static=True)
print(json.dumps({"system": "teacher (transformers generate, static+compiled)", "context": args.context,
                  "batch": args.batch, "gen": args.gen, **row, "wall_s": time.time() - t0,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
