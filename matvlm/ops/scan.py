"""The Mamba-2 scan (`ssd`), its decode step (`ssd_step`) and the gated RMSNorm, each dispatched per call
between mamba_ssm's Triton kernels (`ssd_triton`) and the pure-PyTorch reference (`ssd_ref`) by
`backend.backend_for`."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ssd_ref, ssd_triton
from .backend import backend_for

TORCH_CHUNK = 64     # the reference's chunk: small chunks keep its (Q x Q) blocks cheap on CPU
TRITON_CHUNK = 256   # mamba_ssm's Mamba2 default chunk size


@torch.compiler.disable   # never traced: Triton kernels or the reference's chunked loop, as they are
def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
        initial_state: Tensor | None = None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-2 scan over a sequence.

    Args:
        x: (B, T, H, P); dt: (B, T, H) positive (softplus already applied); A: (H,) negative;
        B, C: (B, T, G, N) with G dividing H; D: (H,) or None;
        initial_state: (B, H, P, N) or None (zeros).
    Returns:
        y: (B, T, H, P) in x's dtype; final_state: (B, H, P, N) float32 (float64 for float64 input).
    """
    if backend_for(x) == "triton":
        return ssd_triton.ssd(x, dt, A, B, C, D, initial_state, chunk_size or TRITON_CHUNK)
    return ssd_ref.ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size or TORCH_CHUNK)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None) -> Tensor:
    """One decode step. state: (B, H, P, N), updated in place; x: (B, H, P); dt: (B, H);
    A: (H,); B, C: (B, G, N); D: (H,). Returns y: (B, H, P)."""
    if backend_for(x) == "triton":
        return ssd_triton.ssd_step(state, x, dt, A, B, C, D)
    return ssd_ref.ssd_step(state, x, dt, A, B, C, D)


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm(x · silu(z)) over channel groups of `group_size`, times weight. x, z: (..., D)."""
    if backend_for(x) == "triton":
        return ssd_triton.gated_rmsnorm(x, z, weight, eps, group_size)
    return ssd_ref.gated_rmsnorm_ref(x, z, weight, eps, group_size)
