"""The Mamba-2 mixer's causal-convolution kernels for training on a GPU (issue 16): forward and backward
checked against float64 on fresh random inputs, then timed (forward + backward) against the PyTorch twin
(F.conv1d with one group per channel) side by side, CUDA events, median of repeats, at SmolLM2-135M's
distillation shapes by default (micro-batch 16 x 1 024 tokens, 1 728 channels: x, B and C of 9 heads of 64).
Exits 1 when the check fails.

    python scripts/conv-kernel-check.py --out conv.json [--batch 16 --seq 1024 --channels 1728]
"""

import argparse

import torch

from matvlm.bench.kernels import finish_check, timed as ms
from matvlm.ops import conv as conv_ops
from matvlm.ops import conv_triton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--channels", type=int, default=1728)
    args = ap.parse_args()
    res, ok = {"device": torch.cuda.get_device_name()}, True
    g = torch.Generator(device="cuda").manual_seed(0)
    for bsz, t, c in ((2, 300, 200), (3, 1030, 1728)):          # correctness: tiles that do not fill
        proj = torch.randn(bsz, t, c + 40, device="cuda", generator=g).bfloat16()
        x = proj[:, :, 8:8 + c]                                  # a strided slice, as the projection gives
        w = torch.randn(c, 4, device="cuda", generator=g).bfloat16()
        b = torch.randn(c, device="cuda", generator=g).bfloat16()
        dy = torch.randn(bsz, t, c, device="cuda", generator=g).bfloat16()
        xd, wd, bd = (v.double().requires_grad_(True) for v in (x, w, b))
        want = conv_ops.causal_conv1d_ref(xd, wd, bd)
        gx, gw, gb = torch.autograd.grad((want * dy.double()).sum(), (xd, wd, bd))
        xk, wk, bk = (v.detach().requires_grad_(True) for v in (x, w, b))
        got = conv_ops.causal_conv1d(xk, wk, bk)                  # the dispatcher, as the mixer calls it
        kx, kw, kb = torch.autograd.grad(got, (xk, wk, bk), dy)
        errs = {name: ((a.double() - r).norm() / r.norm()).item()
                for name, a, r in (("y", got, want), ("dx", kx, gx), ("dw", kw, gw), ("db", kb, gb))}
        res[f"check_{bsz}x{t}x{c}"] = errs
        ok &= all(e < 1e-2 for e in errs.values())
    x = torch.randn(args.batch, args.seq, args.channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(args.channels, 4, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(args.channels, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)

    def step(fn):
        return lambda: torch.autograd.grad(fn(x, w, b), (x, w, b), dy)

    res.update(batch=args.batch, seq=args.seq, channels=args.channels,
               kernel_fwd_bwd_ms=ms(step(conv_triton.causal_conv1d_train)),
               twin_fwd_bwd_ms=ms(step(conv_ops.causal_conv1d_ref)))
    res["speedup"] = res["twin_fwd_bwd_ms"] / res["kernel_fwd_bwd_ms"]
    # bytes the kernels must move: forward x in, y out (bf16); backward x, dy in, g out and in (fp32), dx out
    n = x.numel()
    res["kernel_GB_per_s"] = n * (2 + 2 + 2 + 2 + 4 + 4 + 2) / res["kernel_fwd_bwd_ms"] / 1e6
    res["ok"] = ok
    finish_check(res, args.out, ok)


if __name__ == "__main__":
    main()
