"""Before timing serving (issue 20; meant for a GPU, runs anywhere): does the continuous batcher (fused step,
CUDA graphs, a cache position per slot, each slot reading its own keys) compute what the model computes?

Two checks:
1. Tokens: each request's greedy tokens from the batcher (several requests sharing its slots) against the
   static engine's for that request alone. On a GPU these may differ at near-ties of a random-weight model
   (another split of the keys, another row count in a matrix kernel sums in another order), so they are
   reported, and where they differ both lists are scored against a full forward (regret at each token).
2. Logits (the pass/fail test): every step's logits are recorded, with the requests sharing the slots and
   then with each request alone in the batcher, and compared with one full forward of the model over the
   request's prompt and tokens (its own layers, no decode kernels). A slot that reads a stale or another
   slot's key, or the wrong position, moves the shared run's logits away from the reference by far more
   than rounding does; rounding moves both runs alike. Exits 1 if the shared run's largest relative error
   exceeds --ratio times the alone runs' (plus --floor), or a request failed.
   Token equality alone is a weak test: on the CPU, a fault that made every slot but the first attend one
   position too far still gave every request the same greedy tokens, while its logits moved 1.5e-4 to
   6.6e-4 from the reference, against 4e-7 for the correct batcher (float32).

    python scripts/serve-check.py MODEL_DIR [--requests 6] [--slots 4]
"""

import argparse
import sys

import torch

import matvlm.engine.scheduler as scheduler
from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams
from matvlm.engine.scheduler import ContinuousBatcher, Sequence


def reference_logits(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The full forward's float32 logits at the positions that chose each of `tokens` (len(tokens), V)."""
    device = model.get_output_embeddings().weight.device
    ids = torch.tensor([prompt + tokens], device=device)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1: -1].float()


def run_batcher(engine: Engine, reqs: list[Request], slots: int, together: bool, record: bool):
    """Each request's tokens (or its error) from a continuous batcher; with `record`, every step goes through
    the host's token choice (the path sampled requests take) and each request's logits are kept."""
    got: dict[int, list[int] | BaseException] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    batcher = ContinuousBatcher(engine, slots=slots, length=1024)
    index = {}
    if record:
        def sample(step_logits, seqs):
            for row, seq in zip(step_logits, seqs):
                logits.setdefault(index[id(seq)], []).append(row.float().cpu())
            return step_logits.argmax(-1).tolist()

        batcher._sample = sample
    for i, r in enumerate(reqs):
        seq = Sequence(r, emit=lambda text: None,
                       finish=lambda out, err, i=i: got.__setitem__(i, err if err else out.token_ids))
        index[id(seq)] = i
        batcher.add(seq)
        while not together and batcher.busy:
            batcher.step()
    while batcher.busy:
        batcher.step()
    return got, logits, batcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--ratio", type=float, default=2.0, help="largest allowed shared/alone error ratio (default 2)")
    ap.add_argument("--floor", type=float, default=1e-5, help="relative error always allowed (default 1e-5)")
    args = ap.parse_args()
    engine = Engine.from_dir(args.model)
    words = "the river stone model layer token value time space light".split()
    reqs = [Request(" ".join(words[: 2 + 3 * i % len(words)]) * (1 + i), [],
                    SamplingParams(max_new_tokens=8 + 5 * i, ignore_eos=True)) for i in range(args.requests)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"

    # 1. tokens: the batcher's greedy path (argmax fed on the device, CUDA graphs) against the engine alone
    alone = [engine.generate([r])[0].token_ids for r in reqs]
    got, _, batcher = run_batcher(engine, reqs, args.slots, together=True, record=False)
    failed = [i for i in range(len(reqs)) if not isinstance(got.get(i), list)]
    same = [got.get(i) == alone[i] for i in range(len(reqs))]
    print({"device": device, "fused": engine.fused is not None, "graphs": len(batcher._graphs),
           "eager": sorted(batcher._eager), "same_tokens_as_alone": same, "failed": failed})
    for i in (i for i in range(len(reqs)) if not same[i] and i not in failed):
        prompt = engine.encode(reqs[i])[0]
        row = {"request": i, "first_difference": next(j for j, (a, b) in enumerate(zip(alone[i], got[i])) if a != b)}
        for name, tokens in (("alone", alone[i]), ("batched", got[i])):
            ref = reference_logits(engine.model, prompt, tokens)
            regret = ref.max(1).values - ref.gather(1, torch.tensor(tokens, device=ref.device)[:, None])[:, 0]
            row[name] = {"not_reference_argmax": int((regret > 0).sum()), "regret_max": round(regret.max().item(), 4),
                         "logit_std": round(ref.std(1).mean().item(), 4)}
        print(row)

    # 2. logits: every step of the shared run and of each request alone, against the full forward
    scheduler_all_greedy = scheduler._all_greedy
    scheduler._all_greedy = lambda params: False          # every step through the host's choice (recorded)
    try:
        runs = {name: run_batcher(engine, reqs, args.slots, together=name == "shared", record=True)
                for name in ("shared", "alone")}
    finally:
        scheduler._all_greedy = scheduler_all_greedy
    worst = {}
    for name, (tokens, logits, _) in runs.items():
        errors = []
        for i in range(len(reqs)):
            if not isinstance(tokens.get(i), list):
                failed.append(i)
                continue
            ref = reference_logits(engine.model, engine.encode(reqs[i])[0], tokens[i]).cpu()
            mine = torch.stack(logits[i])
            assert mine.shape == ref.shape, (name, i, mine.shape, ref.shape)
            errors.append(((mine - ref).norm(dim=1) / ref.norm(dim=1)).max().item())
        worst[name] = max(errors) if errors else float("nan")
        print({"run": name, "largest_relative_error_per_request": [f"{e:.2e}" for e in errors]})
    ok = not failed and worst["shared"] <= args.ratio * worst["alone"] + args.floor
    print({"shared_error": worst["shared"], "alone_error": worst["alone"], "failed": sorted(set(failed)),
           "tokens_equal": all(same), "pass": ok})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
