"""Which Mamba-2 scan kernel makes a hybrid's prefill beat attention at long context (issue 20, item 4).

    python scripts/prefill-probe.py --out DIR [--lengths 4096,16384]      (CUDA; fla-core optional)

At TinyLLaVA-3.1B's mixer shapes (32 heads x headdim 80, n_groups = heads, d_state = 80), batch 1, bf16:
- the scan alone through mamba_ssm's chunked kernels (matvlm's Triton path, `ops.ssd_triton.ssd`) at chunk
  sizes 64 / 128 / 256, and through fla-core's `chunk_simple_gla` (the same recurrence written as
  simple gated linear attention: q = C, k = dt * B, v = x, log-decay g = dt * A, scale 1; D x added after);
  each checked against the float64 chunked reference (`ops.ssd_ref`) on the same inputs: output and final
  state, relative error;
- one whole Mamba2Mixer prefill and one sdpa attention layer (`matvlm.bench.kernels.time_prefill`; attention
  both with the backend torch picks and with cuDNN's off, as matvlm's engine prefills), the
  mixer also with its causal convolution forced onto the PyTorch path (the `conv_triton` kernel against
  `nn.Conv1d`, side by side), the convolution alone both ways (checked against float64), and the mixer's
  prefill kernel by kernel (torch.profiler, the 15 largest).
Times are medians of CUDA-event timings after warm-up. Writes prefill-probe.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def conv_rows(T: int) -> dict:
    """The mixer's prefill with the conv on the PyTorch path, the conv alone both ways, and a kernel table."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.cache_utils import Cache

    from matvlm.bench.kernels import phi2_mixer, rel, timed
    from matvlm.model.cache import MambaLayerState
    from matvlm.ops import conv as conv_ops

    out = {}
    mixer = phi2_mixer()
    u = torch.randn(1, T, 2560, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        run = lambda: mixer(u, cache=Cache(layers=[MambaLayerState()]))      # noqa: E731
        saved = conv_ops.fused_kernels
        conv_ops.fused_kernels = lambda *a, **k: None
        try:
            out["mamba_prefill_conv_torch_ms"] = timed(run)
        finally:
            conv_ops.fused_kernels = saved
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        rows = sorted(((e.device_time_total, e.count, e.key) for e in prof.key_averages()), reverse=True)[:15]
        out["mamba_prefill_kernels_us"] = [[round(us, 1), n, k[:100]] for us, n, k in rows]
        c = mixer.conv1d.weight.shape[0]
        x = torch.randn(1, T, c + 2592, device="cuda", dtype=torch.bfloat16)[:, :, 2560:2560 + c]
        w, b = mixer.conv1d.weight[:, 0], mixer.conv1d.bias
        want = conv_ops.causal_conv1d_ref(x.double(), w.double(), b.double())
        got = conv_ops.causal_conv1d(x, w, b)
        out["conv_kernel"] = {"ms": timed(lambda: conv_ops.causal_conv1d(x, w, b)), "err": rel(got, want)}
        out["conv_torch"] = {"ms": timed(lambda: conv_ops.causal_conv1d_ref(x, w, b)),
                             "err": rel(conv_ops.causal_conv1d_ref(x, w, b), want)}
    return out


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
        row.update(conv_rows(T))
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
