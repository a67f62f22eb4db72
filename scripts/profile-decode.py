"""Where a decode step's time goes: per-kernel GPU time of the engine's captured decode step.

For the 25 % hybrid and the teacher at TinyLLaVA-3.1B shapes (random weights, bf16), at 1 K and 16 K
context, batch 1: the engine's step time, a bare graph replay, and a `torch.profiler` table of the
kernels inside one step (eager and captured); then the bf16 GEMV rate of the LM's matmul shapes at
batch 1 (what bounds a batch-1 step below the HBM roofline). GPU only.

    python scripts/profile-decode.py --out prof/ [--compile]
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from matvlm.bench.speed import Cell, _NullTokenizer, engine_cell, resolve
from matvlm.engine.engine import Engine


def ms_per_call(fn, n: int = 50) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def kernel_table(fn, steps: int = 3) -> tuple[float, list[tuple[float, int, str]]]:
    """(total kernel µs per step, [(µs per step, launches per step, kernel name)] sorted by time)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    agg = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            agg[evt.name][0] += 1
            agg[evt.name][1] += evt.device_time_total
    rows = sorted(((us / steps, n // steps, name) for name, (n, us) in agg.items()), reverse=True)
    return sum(r[0] for r in rows), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compile", action="store_true", help="profile the compiled decode step")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {}
    for name, spec in (("hybrid25", "random:tinyllava-phi2@0.25"), ("teacher", "random:tinyllava-phi2")):
        model, _ = resolve(spec, torch.bfloat16)
        engine = Engine(model, _NullTokenizer(), dtype=torch.bfloat16, compile=args.compile)
        vocab = model.get_output_embeddings().out_features
        for context in (1024, 16384):
            r = engine_cell(engine, Cell(context, 1, 64), vocab)
            st = engine._statics[max((k for k in engine._statics if k[0] == 1), key=lambda k: k[1])]  # this context's bucket
            key = f"{name}-{context}"
            res[key] = {"engine_step_ms": r["step_ms"], "graph_replay_ms": ms_per_call(st.graph.replay)}
            for mode, fn in (("eager", lambda: engine._decode_body(st)), ("graph", st.graph.replay)):
                total, rows = kernel_table(fn)
                res[key][f"{mode}_kernel_us"] = total
                lines = [f"total kernel time {total:.1f} us per step, {sum(r[1] for r in rows)} kernels"]
                lines += [f"{us:9.1f} us {n:5d}x  {k[:150]}" for us, n, k in rows]
                (args.out / f"kernels-{key}-{mode}.txt").write_text("\n".join(lines) + "\n")
            print(key, res[key], flush=True)
        del engine, model
        torch.cuda.empty_cache()
    for d_in, d_out in ((2560, 7680), (2560, 2560), (2560, 10240), (10240, 2560)):
        x = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(20)]   # beyond L2

        def gemvs():
            for w in ws:
                torch.nn.functional.linear(x, w)
        graph = torch.cuda.CUDAGraph()
        gemvs()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph):
            gemvs()
        us = 1e3 * ms_per_call(graph.replay) / len(ws)
        res[f"gemv-{d_in}x{d_out}"] = {"us": us, "GB_per_s": d_in * d_out * 2 / (us * 1e-6) / 1e9}
        print(f"gemv {d_in}x{d_out}", res[f"gemv-{d_in}x{d_out}"], flush=True)
    (args.out / "profile.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
