"""Distillation losses (paper §3.3, Eq. 7-11) as pure tensor functions.

    L = alpha * L_layer + beta * L_prob + gamma * L_ce

Each function returns a per-token tensor (B, T); `reduce_sum` turns it into a sum over the
real tokens only (never padding), which the trainer divides by the number of real tokens in the
*global* batch, so a loss is a per-token mean whatever the micro-batching or number of processes:

- L_prob = T² · KL(P_teacher ‖ P_student) at every real position, softmaxes at temperature T;
- L_layer = Σ over Mamba layers of the per-token L2 distance ‖T_l(x) − S_l(x)‖₂ between the teacher's
  layer output and the student's layer output on the teacher's input to that layer;
- L_ce = next-token cross-entropy on answer tokens (labels != -100), averaged over answer tokens.

`loss_reduction="sum"` reproduces MaTVLM's unnormalised training loss instead (per MaTVLM's
train_hybrid.py): KL summed over positions and vocabulary and divided by the micro-batch size
(`F.kl_div(..., reduction="batchmean") * T**2`), and the layer term as the Frobenius norm of the
whole (B, T, D) difference per layer (`torch.norm(s - t, p=2)`), summed over layers. Upstream does
not mask padding; here padding is always masked, which is the same when a micro-batch has none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def kl_per_token(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per position. logits: (B, T, V) -> (B, T), float32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature ** 2 * (t.exp() * (t - s)).sum(-1)


def layer_distance_per_token(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """‖teacher − student‖₂ over the hidden dimension. (B, T, D) -> (B, T), float32."""
    return (teacher_out.float() - student_out.float()).norm(dim=-1)


def layer_sq_distance_per_token(student_out: Tensor, teacher_out: Tensor) -> Tensor:
    """‖teacher − student‖₂² per position (for the Frobenius form of `loss_reduction="sum"`)."""
    return (teacher_out.float() - student_out.float()).pow(2).sum(-1)


def ce_per_token(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of predicting labels[t+1] from logits[t]; 0 where the target is -100.

    student_logits: (B, T, V); labels: (B, T) with -100 on non-answer tokens. Returns (B, T)
    (the last position, which predicts nothing, is 0).
    """
    b, t, v = student_logits.shape
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]
    ce = F.cross_entropy(student_logits.float().reshape(b * t, v), target.reshape(b * t),
                         ignore_index=-100, reduction="none")
    return ce.view(b, t)


def answer_mask(labels: Tensor) -> Tensor:
    """(B, T) bool: positions whose next token is an answer token (the positions L_ce is taken at)."""
    m = torch.zeros_like(labels, dtype=torch.bool)
    m[:, :-1] = labels[:, 1:] != -100
    return m


def reduce_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """Sum of a (B, T) per-token loss over positions where mask is true (padding excluded)."""
    return (per_token * mask.to(per_token.dtype)).sum()
