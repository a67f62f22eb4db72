"""A decode step's matrix-vector product with the norm before it, the activations on either side and the
residual add folded in (`linear`): on CUDA for one row the Triton kernel in `gemv_triton`, otherwise its
PyTorch twin `linear_ref` (for 8 rows cuBLAS after a separate norm / activation beat the kernel's 16-row
variant on an H100: docs/benchmarks.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import decode_kernels

NormSpec = tuple  # (kind "layer" | "rms", weight, bias or None, eps)


def linear(x: Tensor | None, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None, *,
           norm: NormSpec | None = None, tail: Tensor | None = None, act: str | None = None,
           out_act: str | None = None, out_act_from: int = 0) -> Tensor:
    """[norm(x) | act(tail)] @ weight.T (+ bias), out_act on its output features from `out_act_from`
    on, (+ residual).

    x: (B, K1) or None; norm: ("layer", weight, bias, eps) as `nn.LayerNorm`, ("rms", weight, None, eps)
    as transformers' RMSNorm, or None; tail: (B, K - K1) or None; act: None, "gelu_tanh", "gelu", or
    "silu_mul" (tail is (B, 2 (K - K1)): silu of its first half times its second half); out_act: None,
    "gelu_tanh" or "gelu"; weight: (N, K). Under programmatic dependent launch (on by default on Hopper,
    `backend.dependent_launch`) the one-row kernel loads its first block of `weight` before it waits for
    the kernel before it, so `weight` must not be written by the kernel launched just before this call."""
    if out_act not in (None, "gelu_tanh", "gelu"):
        raise ValueError(f"out_act must be None, 'gelu_tanh' or 'gelu', got {out_act!r}")
    src = x if x is not None else tail
    kernels = decode_kernels("gemv_triton", src)
    if (kernels is not None and src.dim() == 2 and src.shape[0] == 1 and weight.dtype == src.dtype
            and weight.stride(-1) == 1 and all(t is None or t.stride(-1) == 1 for t in (x, tail))):
        kind, nw, nb, eps = norm if norm is not None else (None, None, None, 1e-5)
        return kernels.gemv(x, weight, bias, residual.contiguous() if residual is not None else None, tail, nw, nb,
                            float(eps), kernels.NORMS[kind], kernels.ACTS[act], kernels.ACTS[out_act], out_act_from)
    return linear_ref(x, weight, bias, residual, norm=norm, tail=tail, act=act, out_act=out_act,
                      out_act_from=out_act_from)


def linear_ref(x: Tensor | None, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None, *,
               norm: NormSpec | None = None, tail: Tensor | None = None, act: str | None = None,
               out_act: str | None = None, out_act_from: int = 0) -> Tensor:
    """`linear` in PyTorch ops (any device and dtype): the kernel's twin."""
    parts = []
    if x is not None:
        parts.append(_norm(x, norm) if norm is not None else x)
    if tail is not None:
        parts.append(_activation(tail, act))
    y = F.linear(torch.cat(parts, -1) if len(parts) > 1 else parts[0], weight, bias)
    if out_act is not None:
        y = torch.cat([y[:, :out_act_from], _activation(y[:, out_act_from:], out_act)], -1)
    return y + residual if residual is not None else y


def _norm(x: Tensor, spec: NormSpec) -> Tensor:
    kind, weight, bias, eps = spec
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x.float()                                         # as transformers' Llama/Qwen2/Mistral RMSNorm
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _activation(t: Tensor, act: str | None) -> Tensor:
    if act is None:
        return t
    if act == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if act == "gelu":
        return F.gelu(t)
    if act == "silu_mul":
        gate, up = t.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {act!r}")
