"""The fused decode step's variants side by side (GPU only): Phi's fc2 on a second stream beside the
mixer or before it on one stream, each with programmatic dependent launch off and on; the 25 % hybrid at
TinyLLaVA-3.1B shapes (random weights, bf16), batch 1, every cell measured in turn, twice. Also writes one
captured step's per-kernel timeline (start, duration, stream) for each variant at the first context, to
find where a step's time goes beyond its bytes (issue 20 item 3).

    python scripts/decode-variants-probe.py --out DIR [--contexts 1024,4096,16384] [--spec random:...]
"""

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from matvlm.bench.kernels import ceilings
from matvlm.bench.speed import Cell, _NullTokenizer, engine_cell, resolve, roofline_ms
from matvlm.engine.engine import Engine
from matvlm.ops.backend import dependent_launch, set_dependent_launch

VARIANTS = [("two streams", True, False), ("two streams, PDL", True, True), ("one stream", False, False),
            ("one stream, PDL", False, True)]


def timeline(replay) -> list[dict]:
    """Kernels of one graph replay: name, start (µs from the first), duration (µs), stream."""
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    rows = [{"name": e.name[:120], "start_us": e.time_range.start, "dur_us": e.time_range.elapsed_us(),
             "stream": getattr(e, "device_resource_id", None)}
            for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    t0 = min((r["start_us"] for r in rows), default=0)
    for r in rows:
        r["start_us"] -= t0
    return sorted(rows, key=lambda r: r["start_us"])


def busy(tl: list[dict]) -> dict:
    """Where one step's time goes: its span, the union of kernel busy time, the idle gaps between kernels, and the
    time per kernel family (the name up to its first '(' or '<'), largest first."""
    spans = sorted((t["start_us"], t["start_us"] + t["dur_us"]) for t in tl)
    union, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            union += b - a
            end = b
        elif b > end:
            union += b - end
            end = b
    families: dict[str, float] = {}
    for t in tl:
        name = t["name"].split("(")[0].split("<")[0]
        families[name] = families.get(name, 0.0) + t["dur_us"]
    span = max(b for _, b in spans) if spans else None
    return {"kernel_span_us": span, "busy_us": union, "gaps_us": span - union if spans else None,
            "by_family_us": dict(sorted(families.items(), key=lambda kv: -kv[1])[:8])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="1024,4096,16384")
    ap.add_argument("--spec", default="random:tinyllava-phi2@0.25")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    copy = ceilings()["copy_GBps"]
    model, _ = resolve(args.spec, torch.bfloat16)
    engine = Engine(model, _NullTokenizer(), dtype=torch.bfloat16)
    vocab = model.get_output_embeddings().out_features
    contexts = [int(c) for c in args.contexts.split(",")]
    before = set_dependent_launch(True)
    pdl_works = dependent_launch(torch.empty(1, device="cuda"))      # Hopper or later, and Triton with griddepcontrol
    set_dependent_launch(before)
    res = {"device": torch.cuda.get_device_name(), "copy_GBps": copy, "spec": args.spec, "pdl_works": pdl_works,
           "rows": []}
    for rnd in range(args.rounds):
        for context in contexts:
            roof = roofline_ms(model, Cell(context, 1, args.gen), copy)
            for name, side, pdl in VARIANTS:
                engine.fused.side_stream = side
                before = set_dependent_launch(pdl)
                try:
                    r = engine_cell(engine, Cell(context, 1, args.gen), vocab)
                    if rnd == 0 and context == contexts[0] and "step_ms" in r:
                        st = next(iter(engine._statics.values()))
                        saved = [t.clone() for t in engine._step_tensors(st)]    # the replays advance the slot
                        tl = timeline(st.graph.replay)
                        engine._restore(st, saved)
                        (args.out / f"timeline-{name.replace(', ', '-').replace(' ', '-')}-{context}.json").write_text(
                            json.dumps(tl))
                        r["kernels"] = len(tl)
                        r.update(busy(tl))
                finally:
                    set_dependent_launch(before)
                row = {"round": rnd, "context": context, "variant": name, "roofline_ms": roof, **r,
                       "pdl_active": pdl and pdl_works}
                if "step_ms" in r:
                    row["of_roofline"] = roof / r["step_ms"]
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "first_tokens"}), flush=True)
    base = {(r["round"], r["context"]): r.get("first_tokens") for r in res["rows"] if r["variant"] == VARIANTS[0][0]}
    res["tokens_equal_across_variants"] = all(r.get("first_tokens") == base[(r["round"], r["context"])]
                                              for r in res["rows"])
    (args.out / "variants.json").write_text(json.dumps(res, indent=1))
    print("tokens equal across variants:", res["tokens_equal_across_variants"])


if __name__ == "__main__":
    main()
