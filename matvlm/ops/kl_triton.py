"""Triton kernel of `ops.kl.kl_and_grad`: per row of logits, T²·KL(softmax(t/T) ‖ softmax(s/T)) and its
gradient with respect to s, T·(softmax(s/T) − softmax(t/T)), in two passes over the row.

The distillation step's LM head (distill/losses.py) spent most of its time in float32 element-wise passes
over the logits (casts, two log-softmaxes, exp, products, the difference): about 36 of 41 ms per
16K-token micro-batch on an H100 (docs/benchmarks.md). Here each row is read twice in its own dtype (a
running max and sum of exponentials for both softmaxes, then the KL and the gradient) and the gradient
written once, in float32 arithmetic. One program per row. Its PyTorch twin is `ops.kl.kl_and_grad_ref`;
the tests check the kernel against it and against float64 in Triton's interpreter. Imported only when
triton is installed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 2048


@triton.jit
def _kl_rows(s_ptr, t_ptr, ds_ptr, kl_ptr, V, stride_s, stride_t, stride_ds, inv_T, T,
             BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row, t_row, d_row = s_ptr + row * stride_s, t_ptr + row * stride_t, ds_ptr + row * stride_ds
    offs = tl.arange(0, BLOCK_V)
    # pass 1: per-lane running max and sum of exponentials of s/T and t/T
    m_s = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_V,), tl.float32)
    l_t = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        x = tl.load(s_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_T
        y = tl.load(t_row + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_T
        new_s, new_t = tl.maximum(m_s, x), tl.maximum(m_t, y)
        # lanes that have seen nothing yet keep max -inf: guard the -inf - -inf
        l_s = tl.where(new_s == float("-inf"), 0.0, l_s * tl.exp(m_s - new_s) + tl.exp(x - new_s))
        l_t = tl.where(new_t == float("-inf"), 0.0, l_t * tl.exp(m_t - new_t) + tl.exp(y - new_t))
        m_s, m_t = new_s, new_t
    top_s, top_t = tl.max(m_s, 0), tl.max(m_t, 0)
    lse_s = top_s + tl.log(tl.sum(tl.where(m_s == float("-inf"), 0.0, l_s * tl.exp(m_s - top_s)), 0))
    lse_t = top_t + tl.log(tl.sum(tl.where(m_t == float("-inf"), 0.0, l_t * tl.exp(m_t - top_t)), 0))
    # pass 2: the KL terms and the gradient
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        inside = cols < V
        log_ps = tl.load(s_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_T - lse_s
        log_pt = tl.load(t_row + cols, mask=inside, other=0.0).to(tl.float32) * inv_T - lse_t
        pt = tl.exp(log_pt)
        acc += tl.where(inside, pt * (log_pt - log_ps), 0.0)
        grad = T * (tl.exp(log_ps) - pt)
        tl.store(d_row + cols, grad.to(ds_ptr.dtype.element_ty), mask=inside)
    tl.store(kl_ptr + row, T * T * tl.sum(acc, 0))


def kl_and_grad(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(T²·KL per row, float32 (n,); its gradient with respect to s, (n, V) in s's dtype) for logits s, t
    of shape (n, V) on a CUDA device (or CPU tensors under TRITON_INTERPRET=1)."""
    s, t = s.contiguous(), t.contiguous()
    n, v = s.shape
    ds = torch.empty_like(s)
    kl = torch.empty(n, dtype=torch.float32, device=s.device)
    if n:
        _kl_rows[(n,)](s, t, ds, kl, v, s.stride(0), t.stride(0), ds.stride(0), 1.0 / temperature,
                       float(temperature), BLOCK_V=min(BLOCK, triton.next_power_of_2(v)), num_warps=8)
    return kl, ds
