"""Before timing serving (issue 20; meant for a GPU, runs anywhere): does the continuous batcher (fused step,
CUDA graphs, a cache position per slot, each slot reading its own keys, greedy steps run one ahead of the
host) compute what the model computes?

The batcher serves the requests twice, sharing its slots and then each alone, on the path greedy serving
takes. Every step's logits are recorded (the first token's from prefill, then each decode step's, read
after the step is queued) and compared with one full forward of the model over the request's prompt and
tokens (its own layers, no decode kernels). Exits 1 if a request failed, if the alone runs' largest
relative error exceeds --limit (a fault that hits every slot: wrong position, rotary, stale keys), or if
the shared run's exceeds --ratio times the alone runs' plus --floor (slots that disturb each other).

Greedy tokens are also compared with the static engine's for each request alone, and reported: they are a
weak test. On a random-weight model the top logits are near-ties at nearly every step, so a different
summation order flips some tokens on a GPU; and on the CPU a fault that made every slot but the first attend
one position too far left every greedy token equal while moving the logits 1.5e-4 to 6.6e-4 from the
reference, against 4e-7 for the correct batcher (float32). In bf16 rounding alone moves the logits far more
than that; `--dtype float32` gives the check its full sensitivity.

    python scripts/serve-check.py MODEL_DIR [--requests 6] [--slots 4] [--dtype float32]
"""

import argparse
import sys

import torch

from matvlm.bench.speed import reference_logits
from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams
from matvlm.engine.scheduler import ContinuousBatcher, Sequence


def serve(engine: Engine, reqs: list[Request], slots: int, together: bool):
    """Each request's tokens (or its error) and each step's logits rows from a continuous batcher, on the
    greedy path: the prefill's logits where the batcher chooses a first token, each decode step's logits
    copied on the device right after the step is queued (a request's spare step past its end is dropped)."""
    got: dict[int, list[int] | BaseException] = {}
    rows: dict[int, list[torch.Tensor]] = {}
    batcher = ContinuousBatcher(engine, slots=slots, length=1024)
    index: dict[int, int] = {}
    choose, launch = batcher._sample, batcher._launch

    def recording_choose(step_logits, seqs):
        for row, seq in zip(step_logits, seqs):
            rows.setdefault(index[id(seq)], []).append(row.detach().float().clone())
        return choose(step_logits, seqs)

    def recording_launch(k, length):
        launch(k, length)
        step = batcher.pool.logits[:k].clone()
        for row, seq in batcher.running.items():
            if row < k:
                rows.setdefault(index[id(seq)], []).append(step[row])

    batcher._sample, batcher._launch = recording_choose, recording_launch
    for i, r in enumerate(reqs):
        seq = Sequence(r, emit=lambda text: None,
                       finish=lambda out, err, i=i: got.__setitem__(i, err if err else out.token_ids))
        index[id(seq)] = i
        batcher.add(seq)
        while not together and batcher.busy:
            batcher.step()
    while batcher.busy:
        batcher.step()
    logits = {i: torch.stack(rs)[: len(got[i])].cpu() for i, rs in rows.items() if isinstance(got.get(i), list)}
    return got, logits, batcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the engine's for the device)")
    ap.add_argument("--limit", type=float, default=None,
                    help="largest relative error allowed alone (default 1e-4 in float32, 5e-2 in half precision)")
    ap.add_argument("--ratio", type=float, default=2.0, help="largest allowed shared/alone error ratio (default 2)")
    ap.add_argument("--floor", type=float, default=1e-5, help="relative error always allowed (default 1e-5)")
    args = ap.parse_args()
    engine = Engine.from_dir(args.model, dtype=args.dtype)
    limit = args.limit if args.limit is not None else (1e-4 if engine.dtype == torch.float32 else 5e-2)
    words = "the river stone model layer token value time space light".split()
    reqs = [Request(" ".join(words[: 2 + 3 * i % len(words)]) * (1 + i), [],
                    SamplingParams(max_new_tokens=8 + 5 * i, ignore_eos=True)) for i in range(args.requests)]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    alone_tokens = [engine.generate([r])[0].token_ids for r in reqs]
    worst, failed = {}, set()
    for name in ("shared", "alone"):
        tokens, logits, batcher = serve(engine, reqs, args.slots, together=name == "shared")
        errors = []
        for i in range(len(reqs)):
            if i not in logits:
                failed.add(i)
                continue
            ref = reference_logits(engine.model, engine.encode(reqs[i])[0], tokens[i]).cpu()
            assert logits[i].shape == ref.shape, (name, i, logits[i].shape, ref.shape)
            errors.append(((logits[i] - ref).norm(dim=1) / ref.norm(dim=1)).max().item())
        worst[name] = max(errors) if errors else float("nan")
        same = [tokens.get(i) == alone_tokens[i] for i in range(len(reqs))]
        print({"run": name, "device": device, "dtype": str(engine.dtype), "fused": engine.fused is not None,
               "graphs": len(batcher._graphs), "eager": sorted(batcher._eager),
               "largest_relative_error_per_request": [f"{e:.2e}" for e in errors],
               "greedy_tokens_as_the_engine_alone": same,
               "first_difference": [next((j for j, (a, b) in enumerate(zip(alone_tokens[i], tokens[i])) if a != b),
                                         None) if isinstance(tokens.get(i), list) else "failed"
                                    for i in range(len(reqs))]})
    ok = (not failed and worst["alone"] <= limit
          and worst["shared"] <= args.ratio * worst["alone"] + args.floor)
    print({"shared_error": worst["shared"], "alone_error": worst["alone"], "limit": limit, "failed": sorted(failed),
           "pass": ok})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
