"""T²·KL(softmax(t/T) ‖ softmax(s/T)) per row of logits and its gradient with respect to the student's
logits s, for the distillation loss's LM head (distill/losses.py): on CUDA the two-pass Triton kernel in
`kl_triton`, otherwise its PyTorch twin `kl_and_grad_ref`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .backend import fused_kernels


def kl_and_grad(s: Tensor, t: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(T²·KL per row, float32 (n,); d(Σ T²·KL)/ds, (n, V)) for logits s (student), t (teacher) of shape
    (n, V). The gradient is float32 on the PyTorch path and s's dtype from the kernel."""
    kernels = fused_kernels("kl_triton", s)
    if kernels is not None and s.dim() == 2 and t.shape == s.shape:
        return kernels.kl_and_grad(s, t, temperature)
    return kl_and_grad_ref(s, t, temperature)


def kl_and_grad_ref(s: Tensor, t: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """`kl_and_grad` in PyTorch ops (any device and dtype), in float32."""
    log_ps = F.log_softmax(s.float() / temperature, -1)
    log_pt = F.log_softmax(t.float() / temperature, -1)
    pt = log_pt.exp()
    kl = temperature ** 2 * (pt * (log_pt - log_ps)).sum(-1)
    return kl, temperature * (log_ps.exp() - pt)
