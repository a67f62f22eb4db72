"""Whether programmatic dependent launch (PDL) changes what the fused decode step computes or only its
rounding (GPU only). Greedy-decodes the same random prompt with PDL off and on, then scores each run's
tokens against an independent reference: one full forward of the model over the prompt and that run's own
tokens (the model's own layers, no decode kernels). A race would pick tokens far from the reference's
argmax; different rounding picks only near-ties. Prints and writes one JSON line per context and setting.

    python scripts/pdl-equivalence.py --out DIR [--contexts 1024,16384] [--spec random:...] [--gen 64]
"""

import argparse
import json
from pathlib import Path

import torch

from matvlm.bench.speed import _NullTokenizer, _random_prompts, reference_logits, resolve
from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams
from matvlm.ops.backend import dependent_launch, set_dependent_launch


def regrets(model, prompt: list[int], tokens: list[int]) -> tuple[torch.Tensor, float]:
    """Reference logit of its argmax minus that of the chosen token at each generated position (float32),
    and the logits' mean standard deviation (their scale)."""
    logits = reference_logits(model, prompt, tokens)
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return (logits.max(1).values - chosen).cpu(), logits.std(1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="1024,16384")
    ap.add_argument("--spec", default="random:tinyllava-phi2@0.25")
    ap.add_argument("--gen", type=int, default=64)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, _ = resolve(args.spec, torch.bfloat16)
    engine = Engine(model, _NullTokenizer(), dtype=torch.bfloat16)
    vocab = model.get_output_embeddings().out_features
    params = SamplingParams(max_new_tokens=args.gen, ignore_eos=True)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        prompt = _random_prompts(1, context, vocab)[0]
        runs = {}
        for pdl in (False, True):
            before = set_dependent_launch(pdl)
            try:
                engine._statics.clear()                      # capture the step afresh under this setting
                active = dependent_launch(model.get_output_embeddings().weight)
                runs[pdl] = engine.generate([Request(prompt, [], params)])[0].token_ids
            finally:
                set_dependent_launch(before)
            r, scale = regrets(model, prompt, runs[pdl])
            row = {"context": context, "pdl": pdl, "pdl_active": active, "gen": len(runs[pdl]),
                   "not_reference_argmax": int((r > 0).sum()), "regret_max": r.max().item(),
                   "regret_mean": r.mean().item(), "logit_std": scale}
            rows.append(row)
            print(json.dumps(row), flush=True)
        same = [a == b for a, b in zip(runs[False], runs[True])]
        rows.append({"context": context, "first_difference": same.index(False) if False in same else None})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    (args.out / "pdl-equivalence.json").write_text(json.dumps({"device": device, "spec": args.spec, "rows": rows},
                                                              indent=1))


if __name__ == "__main__":
    main()
