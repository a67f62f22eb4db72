"""The distillation loss's KL kernel on a GPU (issue 16): checked against float64 on fresh random logits
at SmolLM2's vocabulary, then timed against its PyTorch twin side by side (CUDA events, median of
repeats) on one LM-head chunk of bf16 logits, with the bytes each must move and the copy bandwidth
measured in the same run. Exits 1 when the check fails.

    python scripts/kl-kernel-check.py --out kl.json [--rows 2730 --vocab 49152]
"""

import argparse

import torch

from matvlm.bench.kernels import finish_check, timed as ms
from matvlm.ops import kl as kl_ops, kl_triton


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=2730)          # distill/losses.py's chunk at vocab 49 152
    ap.add_argument("--vocab", type=int, default=49152)
    args = ap.parse_args()
    res, ok = {"device": torch.cuda.get_device_name()}, True
    g = torch.Generator(device="cuda").manual_seed(0)
    for temp in (1.0, 2.0):                                     # correctness on fresh inputs, float64 reference
        s = (torch.randn(64, args.vocab, device="cuda", generator=g) * 4).bfloat16()
        t = (torch.randn(64, args.vocab, device="cuda", generator=g) * 4).bfloat16()
        kl, ds = kl_triton.kl_and_grad(s, t, temp)
        sd = s.double().requires_grad_(True)
        lp_s, lp_t = torch.log_softmax(sd / temp, -1), torch.log_softmax(t.double() / temp, -1)
        want = temp ** 2 * (lp_t.exp() * (lp_t - lp_s)).sum(-1)
        (want_ds,) = torch.autograd.grad(want.sum(), sd)
        kl_err = ((kl.double() - want).abs() / want.abs()).max().item()
        ds_err = ((ds.double() - want_ds).norm() / want_ds.norm()).item()
        res[f"check_T{temp}"] = {"kl_max_rel_err": kl_err, "grad_rel_err": ds_err}
        ok &= kl_err < 1e-4 and ds_err < 1e-2
    s = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 4
    t = torch.randn(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16) * 4
    copy = torch.empty(4 * s.numel(), device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(copy)
    copy_ms = ms(lambda: dst.copy_(copy))
    res["copy_GB_per_s"] = 2 * copy.numel() * 2 / copy_ms / 1e6
    k_ms, r_ms = ms(lambda: kl_triton.kl_and_grad(s, t, 1.0)), ms(lambda: kl_ops.kl_and_grad_ref(s, t, 1.0))
    kernel_bytes = s.numel() * 2 * 5                            # s and t read twice, the gradient written once
    res.update(rows=args.rows, vocab=args.vocab, kernel_ms=k_ms, twin_ms=r_ms, speedup=r_ms / k_ms,
               kernel_GB_per_s=kernel_bytes / k_ms / 1e6, ok=ok)
    finish_check(res, args.out, ok)


if __name__ == "__main__":
    main()
