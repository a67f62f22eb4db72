"""A Mamba-2 mixer's decode step after its input projection (`mamba_step`): one Triton kernel
(`mamba_decode_triton`) on CUDA in bf16/fp16 outside `torch.compile`, otherwise its PyTorch twin
`mamba_step_ref` (with `ssd_step` and `gated_rmsnorm` dispatching as usual)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import decode_kernels
from .scan import gated_rmsnorm, ssd_step


def mamba_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
               dt_bias: Tensor, A_log: Tensor, D: Tensor, norm_weight: Tensor, eps: float, ngroups: int) -> Tensor:
    """A Mamba-2 mixer's decode step from its input projection zxbcdt (B, 2 DI + 2 G N + H): the causal
    conv over [x | B | C] with its state (B, DI + 2 G N, W - 1) shifted by one, SiLU, the SSM state
    (B, H, P, N) advanced by one step (`ssd_step`), and the gated RMSNorm over groups of DI / G channels.
    Both states are updated in place; returns (B, DI) in zxbcdt's dtype.

    On CUDA in bf16/fp16 one Triton kernel does all of it (`mamba_decode_triton.mamba_step`), outside
    `torch.compile`; otherwise the PyTorch ops below (with `ssd_step` and `gated_rmsnorm` dispatching
    as usual)."""
    kernels = decode_kernels("mamba_decode_triton", zxbcdt)
    if (kernels is not None and not torch.compiler.is_compiling() and zxbcdt.dim() == 2
            and all(t.stride(-1) == 1 for t in (zxbcdt, conv_state, ssm_state)) and conv_weight.is_contiguous()):
        return kernels.mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                  norm_weight, float(eps), ngroups)
    return mamba_step_ref(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, eps,
                          ngroups)


def mamba_step_ref(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                   dt_bias: Tensor, A_log: Tensor, D: Tensor, norm_weight: Tensor, eps: float, ngroups: int) -> Tensor:
    """`mamba_step` in PyTorch ops: the kernel's twin."""
    b = zxbcdt.shape[0]
    _, h, p, n = ssm_state.shape
    di, gn = h * p, ngroups * n
    z, xbc, dt_raw = torch.split(zxbcdt, [di, di + 2 * gn, h], dim=-1)
    window = torch.cat([conv_state.to(xbc.dtype), xbc[:, :, None]], dim=-1)     # (B, C, W)
    conv_state.copy_(window[:, :, 1:])
    xbc = F.silu((window * conv_weight).sum(-1) + conv_bias)
    x, B, C = torch.split(xbc, [di, gn, gn], dim=-1)
    cd = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
    dt = F.softplus(dt_raw.to(cd) + dt_bias.to(cd))
    A = -torch.exp(A_log.to(cd))
    y = ssd_step(ssm_state, x.reshape(b, h, p), dt, A, B.reshape(b, ngroups, n), C.reshape(b, ngroups, n), D.to(cd))
    return gated_rmsnorm(y.reshape(b, di), z, norm_weight, eps, di // ngroups)
