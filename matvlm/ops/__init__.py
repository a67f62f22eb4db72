"""Mamba-2 kernels behind one dispatch point.

Model code calls `ssd`, `ssd_step` and `gated_rmsnorm` from here and nothing else.
Each picks a backend per call:

- ``triton``: mamba_ssm's Triton kernels (CUDA tensors, mamba_ssm installed);
- ``torch``: the pure-PyTorch reference in `ssd_ref` (any device).

``MATVLM_KERNELS=torch|triton|auto`` (default ``auto``) forces a choice; asking for
``triton`` where it cannot run is an error. The path taken is logged once.

Code being traced by `torch.compile` (the engine's compiled decode step) always takes the
PyTorch path: inductor fuses its element-wise work into its own kernels, which the opaque
mamba_ssm launchers would prevent.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import Tensor

from . import ssd_ref, triton_ssd

log = logging.getLogger("matvlm.ops")
_announced: set[str] = set()

TORCH_CHUNK = 64     # the reference's chunk: small chunks keep its (Q x Q) blocks cheap on CPU
TRITON_CHUNK = 256   # mamba_ssm's Mamba2 default chunk size


def backend_for(x: Tensor) -> str:
    """The backend a call on `x` will use: 'triton' or 'torch'."""
    if torch.compiler.is_compiling():
        return "torch"
    want = os.environ.get("MATVLM_KERNELS", "auto").lower()
    if want not in ("auto", "torch", "triton"):
        raise ValueError(f"MATVLM_KERNELS must be auto, torch or triton, got {want!r}")
    if want == "torch":
        choice = "torch"
    else:
        kernels, why = triton_ssd.load() if x.is_cuda else (None, "tensor is on the CPU")
        if kernels is None and want == "triton":
            raise RuntimeError(f"MATVLM_KERNELS=triton but the Triton path is unavailable: {why}")
        choice = "triton" if kernels is not None else "torch"
        if choice == "torch" and x.is_cuda and "fallback" not in _announced:
            _announced.add("fallback")
            log.warning("Mamba-2 kernels: pure-PyTorch fallback on CUDA (%s); expect slow prefill", why)
    if choice not in _announced:
        _announced.add(choice)
        log.info("Mamba-2 kernels: %s", "mamba_ssm Triton" if choice == "triton" else "pure PyTorch")
    return choice


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
        return triton_ssd.ssd(x, dt, A, B, C, D, initial_state, chunk_size or TRITON_CHUNK)
    return ssd_ref.ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size or TORCH_CHUNK)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None) -> Tensor:
    """One decode step. state: (B, H, P, N), updated in place; x: (B, H, P); dt: (B, H);
    A: (H,); B, C: (B, G, N); D: (H,). Returns y: (B, H, P)."""
    if backend_for(x) == "triton":
        return triton_ssd.ssd_step(state, x, dt, A, B, C, D)
    return ssd_ref.ssd_step(state, x, dt, A, B, C, D)


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm(x · silu(z)) over channel groups of `group_size`, times weight. x, z: (..., D)."""
    if backend_for(x) == "triton":
        return triton_ssd.gated_rmsnorm(x, z, weight, eps, group_size)
    return ssd_ref.gated_rmsnorm_ref(x, z, weight, eps, group_size)


__all__ = ["ssd", "ssd_step", "gated_rmsnorm", "backend_for", "ssd_ref"]
