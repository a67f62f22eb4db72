"""The Mamba-2 mixer's depthwise causal convolution (and SiLU) over a sequence: on CUDA the Triton kernels in
`conv_triton` (for prefill, and with their backward for training when there are no cached inputs), otherwise
their PyTorch twin `causal_conv1d_ref`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import fused_kernels


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None,
                  silu: bool = True) -> Tensor:
    """y[t] = act(bias + Σ_k weight[:, k] · x[t - (K-1) + k]) per channel, positions before 0 read from
    `initial_state` (the K-1 previous inputs) or zeros. x: (B, T, C); weight: (C, K); bias: (C,) or None;
    initial_state: (B, C, K-1) or None. Returns (B, T, C) in x's dtype."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, initial_state))
    kernels = None if torch.compiler.is_compiling() else fused_kernels("conv_triton", x)
    if kernels is not None and x.dim() == 3 and weight.stride(1) == 1:
        if not grad:
            return kernels.causal_conv1d(x, weight, bias, initial_state, silu)
        if initial_state is None:
            return kernels.causal_conv1d_train(x, weight, bias, silu)
    return causal_conv1d_ref(x, weight, bias, initial_state, silu)


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None,
                      silu: bool = True) -> Tensor:
    """`causal_conv1d` through `F.conv1d` with one group per channel (any device and dtype, autograd)."""
    k = weight.shape[1]
    xt = x.transpose(1, 2)                                            # (B, C, T)
    if initial_state is None:
        xt = F.pad(xt, (k - 1, 0))
    else:
        xt = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)      # (B, C, K-1+T)
    y = F.conv1d(xt, weight[:, None, :], bias, groups=weight.shape[0])
    return (F.silu(y) if silu else y).transpose(1, 2)                 # (B, T, C)
