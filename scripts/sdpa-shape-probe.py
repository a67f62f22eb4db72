"""What a new sequence length costs in torch's sdpa, with and without the cuDNN backend (issues 16 and 20).

    python scripts/sdpa-shape-probe.py --out DIR [--model SMALL_VLM_DIR]      (CUDA)

cuDNN's attention builds an execution graph for every new shape on the host (reported in the hundreds
of milliseconds: sglang#4650, torchtune#1652); flash and memory-efficient attention have no such step.
Serving prefills prompts of every length and distillation pads batches to their longest row, so most
calls are a new shape. For each of 6 lengths never seen before, at TinyLLaVA-3.1B's attention shape
(32 heads x 80, bf16), the wall time of the first call and the median of later ones, forward (causal,
and a boolean padding mask) and forward + backward, with every backend on and with cuDNN off; the
kernel each one ran. With --model (a small VLM, e.g. scripts/random-tinyllava.py --small, converted): the
continuous batcher's prefill of 24 requests of new lengths, wall time per request, both ways (with cuDNN:
the batcher's own `sdpa_without_cudnn` replaced by a no-op, so torch picks as it would without it).
Writes sdpa-shape-probe.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def wall(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def kernel(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()
             or "flash" in e.key.lower() or "cudnn" in e.key.lower()]
    return sorted(names, key=len)[0][:80] if names else "?"


def sdpa_rows(cudnn: bool, lengths: list[int], batch: int) -> list[dict]:
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    rows = []
    for t in lengths:
        q, k, v = (torch.randn(batch, 32, t, 80, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        mask = torch.ones(batch, 1, t, t, device="cuda", dtype=torch.bool).tril()
        mask[0, :, :, : t // 8] = False
        mask[0, :, :, 0] = True
        cases = {
            "causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            "bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "causal_fwd_bwd": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward(),
            "bool_mask_fwd_bwd": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward(),
        }
        for name, fn in cases.items():
            first = wall(fn)
            later = statistics.median(wall(fn) for _ in range(5))
            rows.append({"T": t, "case": name, "first_ms": round(first, 3), "later_ms": round(later, 3),
                         "kernel": kernel(fn)})
    torch.backends.cuda.enable_cudnn_sdp(True)
    return rows


def batcher_rows(model: str, cudnn: bool, seed: int, device: str = "cuda") -> dict:
    """Wall time of each request's admission (encode + prefill + first token) in a fresh batcher."""
    import random

    from matvlm.engine.engine import Engine, Request
    from matvlm.engine.sampling import SamplingParams
    from matvlm.engine.scheduler import ContinuousBatcher, Sequence
    from matvlm.inputs.prompts import render

    from contextlib import nullcontext

    import matvlm.engine.scheduler as scheduler

    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    saved_context = scheduler.sdpa_without_cudnn
    if cudnn:           # the batcher turns cuDNN off for its prefill since this probe: let it pick, as before
        scheduler.sdpa_without_cudnn = nullcontext
    eng = Engine.from_dir(model, device=device)
    b = ContinuousBatcher(eng, slots=4, length=2048)
    b.warm_up()
    rng = random.Random(seed)
    times, starts = [], {}
    original = b._prefill_chunk

    def timed_chunk(seq, budget):
        torch.cuda.synchronize()
        t = time.perf_counter()
        n = original(seq, budget)
        torch.cuda.synchronize()
        starts[id(seq)] = starts.get(id(seq), 0.0) + (time.perf_counter() - t) * 1e3
        return n

    b._prefill_chunk = timed_chunk
    for i in range(24):
        words = " ".join(rng.choice(["river", "stone", "light", "model", "time"]) for _ in range(rng.randint(20, 400)))
        prompt = render(eng.processor, eng.model.config, [{"role": "user", "content": words}], 0)
        seq = Sequence(Request(prompt, [], SamplingParams(max_new_tokens=2, ignore_eos=True)),
                       emit=lambda text: None, finish=lambda out, err: None)
        b.add(seq)
        while b.busy:
            b.step()
        times.append(starts.pop(id(seq), 0.0))
    torch.backends.cuda.enable_cudnn_sdp(True)
    scheduler.sdpa_without_cudnn = saved_context
    return {"prefill_ms_per_request": [round(x, 2) for x in times], "median_ms": round(statistics.median(times), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sdpa-shape-probe needs a CUDA device", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "batch": args.batch}
    # the two settings take disjoint lengths: each length is new to whichever setting meets it
    out["sdpa_default"] = sdpa_rows(True, [301, 517, 1029, 1543, 2111, 3001], args.batch)
    out["sdpa_no_cudnn"] = sdpa_rows(False, [303, 519, 1031, 1545, 2113, 3003], args.batch)
    if args.model:
        out["batcher_default"] = batcher_rows(args.model, True, 1)
        out["batcher_no_cudnn"] = batcher_rows(args.model, False, 2)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "sdpa-shape-probe.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
