"""On a GPU, before timing serving (issue 20): the continuous batcher (fused step, CUDA graphs, a cache
position per slot) gives each request the greedy tokens the static engine gives it alone. Where the two
differ, both token lists are scored against one full forward of the model (its own layers, no decode kernels):
a slot reading another's keys picks tokens far from the reference's argmax, while a different summation order
(another split of the keys, another batch size in a matrix kernel) only flips near-ties, which a random-weight
model has at nearly every step. Exits 1 unless every request is equal, or both lists pick only near-ties
(reference regret at most --tie of the logits' standard deviation at every token).
A bug that perturbs the logits slightly (one stale key among thousands) could still pass as near-ties; the
CPU tests check the batcher's tokens for exact equality on the PyTorch path.

    python scripts/serve-check.py MODEL_DIR [--requests 6]
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams
from matvlm.engine.scheduler import ContinuousBatcher, Sequence


def _regrets():
    spec = importlib.util.spec_from_file_location("pdl_equivalence", Path(__file__).with_name("pdl-equivalence.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.regrets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--tie", type=float, default=0.1, help="largest regret, in logit standard deviations, "
                    "that counts as a near-tie (default 0.1)")
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
    ties_only = True
    regrets = _regrets() if not all(same) else None
    for i in (i for i in range(len(reqs)) if not same[i]):
        if not isinstance(got[i], list):
            print(i, "failed:", got[i])
            ties_only = False
            continue
        prompt = engine.encode(reqs[i])[0]
        row = {"request": i, "first_difference": next(j for j, (a, b) in enumerate(zip(alone[i], got[i])) if a != b)}
        for name, tokens in (("alone", alone[i]), ("batched", got[i])):
            r, scale = regrets(engine.model, prompt, tokens)
            row[name] = {"not_reference_argmax": int((r > 0).sum()), "regret_max": round(r.max().item(), 4),
                         "logit_std": round(scale, 4)}
            ties_only &= r.max().item() <= args.tie * scale
        print(row)
    print({"all_equal": all(same), "differences_are_near_ties": ties_only})
    sys.exit(0 if all(same) or ties_only else 1)


if __name__ == "__main__":
    main()
