"""On a GPU, before timing serving (issue 20): the continuous batcher (fused step, CUDA graphs, a cache
position per slot) gives each request the greedy tokens the static engine gives it alone. Exits 1 if not.

    python scripts/serve-check.py MODEL_DIR [--requests 6]
"""

import argparse
import sys

import torch

from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams
from matvlm.engine.scheduler import ContinuousBatcher, Sequence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=6)
    args = ap.parse_args()
    engine = Engine.from_dir(args.model)
    words = "the river stone model layer token value time space light".split()
    reqs = [Request(" ".join(words[: 2 + 3 * i % len(words)]) * (1 + i), [],
                    SamplingParams(max_new_tokens=8 + 5 * i, ignore_eos=True)) for i in range(args.requests)]
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    batcher = ContinuousBatcher(engine, slots=4, length=1024)
    got: dict[int, list[int]] = {}
    for i, r in enumerate(reqs):
        batcher.add(Sequence(r, emit=lambda text: None,
                             finish=lambda out, err, i=i: got.__setitem__(i, err if err else out.token_ids)))
    while batcher.busy:
        batcher.step()
    same = [got[i] == alone[i] for i in range(len(reqs))]
    print({"fused": engine.fused is not None, "graphs": len(batcher._graphs), "eager": sorted(batcher._eager),
           "same_as_alone": same, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    if not all(same):
        for i in range(len(reqs)):
            print(i, alone[i], got[i])
    sys.exit(0 if all(same) else 1)


if __name__ == "__main__":
    main()
