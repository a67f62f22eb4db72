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

from ..ops.kl import kl_and_grad


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
    """Sum of a (B, T) per-token loss over positions where mask is true (padding excluded: selected, not
    multiplied by zero, so a non-finite value at a pad cannot reach the sum)."""
    return torch.where(mask, per_token, 0).sum()


# --- the LM head and its losses in chunks (no (B, T, V) tensor) ---------------------------------

CHUNK_ELEMENTS = 1 << 27   # logits per chunk: 2^27 float32 = 512 MiB, whatever the vocabulary


class _HeadLosses(torch.autograd.Function):
    """Σ T²·KL(P_t ‖ P_s) and Σ CE over rows, from hidden states through the LM head, chunk by chunk.

    The gradients are computed in the forward pass, chunk by chunk (d(T²·KL)/ds = T·(P_s − P_t),
    dCE/ds = softmax(s) − onehot), so neither the logits of teacher and student nor their softmaxes
    are ever held for the whole batch: the memory that dominated small models' steps (issue 16).
    """

    @staticmethod
    def forward(ctx, h_s, h_t, w_s, b_s, w_t, b_t, target, temperature, chunk, want_kl, want_ce):
        n, d = h_s.shape
        need_w = w_s.requires_grad or (b_s is not None and b_s.requires_grad)
        kl = torch.zeros((), dtype=torch.float32, device=h_s.device)
        ce = torch.zeros((), dtype=torch.float32, device=h_s.device)
        g_kl = torch.zeros(n, d, dtype=torch.float32, device=h_s.device) if want_kl else None
        g_ce = torch.zeros(n, d, dtype=torch.float32, device=h_s.device) if want_ce else None
        gw = {k: torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) for k in ("kl", "ce")} if need_w else {}
        gb = {k: torch.zeros(b_s.shape, dtype=torch.float32, device=b_s.device)
              for k in ("kl", "ce")} if need_w and b_s is not None else {}
        T = temperature
        for lo in range(0, n, chunk):
            hs = h_s[lo:lo + chunk].to(w_s.dtype)                                # (c, d)
            s = F.linear(hs, w_s, b_s)                                          # (c, V)
            grads = []
            if want_kl:                       # the Triton kernel on CUDA: two passes over the row, no float32 copies
                t = F.linear(h_t[lo:lo + chunk].to(w_t.dtype), w_t, b_t)
                kl_rows, ds = kl_and_grad(s, t, T)
                kl += kl_rows.sum()
                grads.append(("kl", ds, g_kl))                                  # (c, V)
                del t, kl_rows
            if want_ce:
                tg = target[lo:lo + chunk]
                valid = tg != -100
                log_p = F.log_softmax(s.float(), -1)
                ce -= log_p.gather(1, tg.clamp_min(0)[:, None])[:, 0].masked_fill(~valid, 0).sum()
                # softmax − onehot on answer targets, 0 on other rows, without boolean indexing (a nonzero,
                # which would wait for the device, per chunk)
                dce = log_p.exp_()
                dce.scatter_add_(1, tg.clamp_min(0)[:, None], -valid[:, None].to(dce.dtype))
                dce.mul_(valid[:, None])
                grads.append(("ce", dce, g_ce))
            for key, ds, g in grads:
                ds = ds.to(w_s.dtype)
                g[lo:lo + chunk] = (ds @ w_s).float()                           # (c, d)
                if need_w:
                    gw[key] += (ds.t() @ hs).float()                            # (V, d)
                    if key in gb:
                        gb[key] += ds.float().sum(0)
        ctx.save_for_backward(*(x if x is not None else torch.empty(0) for x in (g_kl, g_ce)))
        ctx.gw, ctx.gb, ctx.dtypes = gw, gb, (h_s.dtype, w_s.dtype)
        return kl, ce

    @staticmethod
    def backward(ctx, d_kl, d_ce):
        g_kl, g_ce = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        parts = [(d_kl, g_kl, "kl"), (d_ce, g_ce, "ce")]
        dh = sum(dv * g for dv, g, _ in parts if g.numel())
        dh = dh.to(h_dtype) if torch.is_tensor(dh) else None
        dw = sum(dv * ctx.gw[k] for dv, g, k in parts if g.numel()).to(w_dtype) if ctx.gw else None
        db = sum(dv * ctx.gb[k] for dv, g, k in parts if g.numel()) if ctx.gb else None
        return dh, None, dw, db, None, None, None, None, None, None, None


def real_rows(mask: Tensor) -> Tensor:
    """The flat indices of `mask`'s real positions (B*T positions, row-major): what `head_losses` takes as
    `rows`. On a host tensor this waits for nothing; on the device it waits for the queued work."""
    return mask.reshape(-1).nonzero().squeeze(1)


def head_losses(student_hidden: Tensor, teacher_hidden: Tensor | None, head: torch.nn.Linear,
                teacher_head: torch.nn.Linear | None = None, labels: Tensor | None = None,
                mask: Tensor | None = None, temperature: float = 1.0, want_kl: bool = True,
                want_ce: bool = False, chunk: int | None = None, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(Σ T²·KL, Σ CE) of `kl_per_token` / `ce_per_token` summed over real tokens, without the (B, T, V)
    logits: the LM head runs on chunks of the real tokens' hidden states only.

    student_hidden, teacher_hidden: (B, T, D) final hidden states (after the last norm); head: the
    student's LM head (teacher_head the teacher's, default the same); labels: (B, T) with -100 where no
    CE is taken (CE at position t predicts labels[t+1]); mask: (B, T) real tokens (KL is taken at every
    real position, CE at real positions whose next label is an answer); rows: the flat indices of mask's
    real positions (`real_rows(mask)`) where the caller has them without asking the
    device (finding them here waits for the device). Gradients reach student_hidden (and the head's
    parameters if they require grad).
    """
    b, t, d = student_hidden.shape
    mask = torch.ones(b, t, dtype=torch.bool, device=student_hidden.device) if mask is None else mask.bool()
    if want_ce:
        target = torch.full_like(labels, -100)
        target[:, :-1] = labels[:, 1:]
        target = target.masked_fill(~mask, -100)
    else:
        target = torch.zeros(b, t, dtype=torch.long, device=student_hidden.device)
    rows = real_rows(mask) if rows is None else rows                             # real tokens only
    h_s = student_hidden.reshape(b * t, d).index_select(0, rows)                 # (n, D)
    h_t = teacher_hidden.reshape(b * t, d).index_select(0, rows) if want_kl else None
    teacher_head = head if teacher_head is None else teacher_head
    chunk = chunk or max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    return _HeadLosses.apply(h_s, h_t, head.weight, head.bias, teacher_head.weight, teacher_head.bias,
                             target.reshape(-1).index_select(0, rows), temperature, chunk, want_kl, want_ce)
