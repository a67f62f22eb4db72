"""Which Mamba-2 scan kernel makes a hybrid's prefill beat attention at long context (issue 20, item 4).

    python scripts/prefill-probe.py --out DIR [--lengths 4096,16384]      (CUDA; fla-core optional)

At TinyLLaVA-3.1B's mixer shapes (32 heads x headdim 80, n_groups = heads, d_state = 80), batch 1, bf16:
- the scan alone through mamba_ssm's chunked kernels (matvlm's Triton path, `ops.ssd_triton.ssd`) at chunk
  sizes 64 / 128 / 256, and through fla-core's `chunk_simple_gla` (the same recurrence written as
  simple gated linear attention: q = C, k = dt * B, v = x, log-decay g = dt * A, scale 1; D x added after);
  each checked against the float64 chunked reference (`ops.ssd_ref`) on the same inputs: output and final
  state, relative error;
- one whole Mamba2Mixer prefill and one sdpa attention layer (`matvlm.bench.kernels.time_prefill`).
Times are medians of CUDA-event timings after warm-up. Writes prefill-probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from matvlm.bench.kernels import ceilings, rel, scan_inputs, time_prefill, timed
    from matvlm.ops import ssd_ref, ssd_triton

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--lengths", default="4096,16384")
    args = ap.parse_args(argv)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as e:
        chunk_simple_gla, fla_missing = None, str(e)
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "ceilings": ceilings(),
           "fla": None if chunk_simple_gla is None else __import__("fla").__version__, "rows": []}
    if chunk_simple_gla is None:
        res["fla_missing"] = fla_missing

    for T in (int(t) for t in args.lengths.split(",")):
        x, dt, A, B, C, D, _ = scan_inputs(T, seed=T)
        with torch.no_grad():
            y_ref, f_ref = ssd_ref.ssd_chunked(*(t.double() for t in (x, dt, A, B, C, D)), None, chunk_size=64)
        row = {"T": T, **time_prefill(T)}
        for chunk in (64, 128, 256):
            with torch.no_grad():
                y, f = ssd_triton.ssd(x, dt, A, B, C, D, None, chunk)
                row[f"mamba_ssm_c{chunk}"] = {"ms": timed(lambda: ssd_triton.ssd(x, dt, A, B, C, D, None, chunk)),
                                              "y_err": rel(y, y_ref), "state_err": rel(f, f_ref)}
        if chunk_simple_gla is not None:
            def fla_scan():
                k = (B.float() * dt[..., None]).to(x.dtype)                                   # (1, T, H, N)
                o, ht = chunk_simple_gla(C, k, x, g=(dt * A).float(), scale=1.0, output_final_state=True)
                return o + D[:, None].to(o.dtype) * x, ht                                    # ht: (1, H, N, P)
            with torch.no_grad():
                y, f = fla_scan()
                row["fla_chunk_simple_gla"] = {"ms": timed(fla_scan), "y_err": rel(y, y_ref),
                                               "state_err": rel(f.transpose(-1, -2), f_ref)}
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        del y_ref, f_ref
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prefill-probe.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
