"""A decode step's attention: rotary embedding and cache write (`rope_kv`), one-query attention over a
static KV buffer (`decode_attention`), and both in one (`attend`). Each takes the Triton kernels in
`attention_triton` where they apply (CUDA, bf16/fp16, `split_kv_applies`), otherwise its PyTorch twin
(`*_ref`: the rotary in PyTorch ops and sdpa)."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import decode_kernels

DECODE_ATTENTION_MAX_KEYS = 8192
_CUDNN_LOCK = threading.Lock()
_CUDNN_DEPTH = 0              # sdpa_without_cudnn contexts open, in any thread
_CUDNN_SAVED = True           # the setting before the first of them


@contextmanager
def sdpa_without_cudnn():
    """A context (and decorator) in which torch's sdpa does not pick cuDNN's attention; the other backends
    stay as the caller set them. cuDNN attention builds an execution graph on the host for every new
    shape: on an H100 with torch 2.11 the first call at a new length took 36-68 ms against under 1 ms
    for flash attention, whose first and later calls cost the same (`scripts/sdpa-shape-probe.py`,
    docs/benchmarks.md). A prefill is almost always a new length: a continuous batcher's prefill took
    40 ms with cuDNN against 6 ms without. matvlm's prefill, vision tower and scoring run inside it.
    Distillation keeps cuDNN (its vision tower aside), whose kernels are mostly faster once built, and
    pads its batches to few lengths instead (`distill.train.CUDA_PAD_MULTIPLE`). Decode steps (a few
    bucketed shapes, captured once) and what the caller runs outside matvlm are left as they are.
    Safe across threads: cuDNN stays off while any thread is inside."""
    global _CUDNN_DEPTH, _CUDNN_SAVED
    # the flag is process-wide: the first context to enter (any thread) turns cuDNN off, the last to leave
    # restores what was set before, so overlapping contexts in two threads never turn it back on mid-call
    with _CUDNN_LOCK:
        if _CUDNN_DEPTH == 0:
            _CUDNN_SAVED = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _CUDNN_DEPTH += 1
    try:
        yield
    finally:
        with _CUDNN_LOCK:
            _CUDNN_DEPTH -= 1
            if _CUDNN_DEPTH == 0:
                torch.backends.cuda.enable_cudnn_sdp(_CUDNN_SAVED)


def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slot: Tensor, heads: int) -> Tensor:
    """A decode step's queries, keys and values from their projection qkv (B, (H + 2 KV) D): the rotary
    embedding (rotate-half convention; cos, sin: (B, R)) on the first R channels of every query and
    key head, keys and values written into the cache buffers (B, KV, L, D) at `slot`: a () tensor shared
    by every row (the static cache) or (B,), one position per row (the continuous batcher's slots).
    Returns the queries (B, H, D)."""
    kernels = decode_kernels("attention_triton", qkv)
    if kernels is not None and qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1:
        return kernels.rope_kv(qkv, cos, sin, keys, values, slot, heads)
    return rope_kv_ref(qkv, cos, sin, keys, values, slot, heads)


def rope_kv_ref(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slot: Tensor,
                heads: int) -> Tensor:
    """`rope_kv` in PyTorch ops: the kernel's twin."""
    b, kv, d = qkv.shape[0], keys.shape[1], keys.shape[3]
    q = _rotate(qkv[:, :heads * d].reshape(b, heads, d), cos, sin)
    k = _rotate(qkv[:, heads * d:(heads + kv) * d].reshape(b, kv, d), cos, sin)
    v = qkv[:, (heads + kv) * d:].reshape(b, kv, d)
    if slot.dim() == 0:
        keys.index_copy_(2, slot.view(1), k[:, :, None].to(keys.dtype))
        values.index_copy_(2, slot.view(1), v[:, :, None].to(values.dtype))
    else:                                      # row r at slot[r]
        rows = torch.arange(b, device=keys.device)
        keys[rows, :, slot] = k.to(keys.dtype)
        values[rows, :, slot] = v.to(values.dtype)
    return q


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, D) with its first R channels rotated: x cos + rotate_half(x) sin; cos, sin (B, R)."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rot = rot * cos[:, None] + turned * sin[:, None]
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive (B, 1, 1, L) form of a (B, L) bool key mask (0 where True, -inf where False), for
    `decode_attention`'s sdpa path: made once per decode step instead of by sdpa in every layer (with a
    bool mask sdpa converted it per call: 4.6 us per layer at 16 K positions on an H100)."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)[:, None, None]


def split_kv_applies(batch: int, heads: int, kv_heads: int, length: int, per_row: bool = False) -> bool:
    """Whether one-query attention over a (batch, kv_heads, length) buffer goes to the split-KV Triton
    kernel rather than sdpa: one sequence, or sequences each at its own position (`per_row`: the
    continuous batcher's slots, where the kernel reads each row's keys up to its position and sdpa reads
    the whole buffer for every row), at most `DECODE_ATTENTION_MAX_KEYS` positions, and one KV head per
    query head. On an H100 the kernel (with rotary folded in) beat rotary + sdpa there at
    head sizes 80 and 128 (10.6 / 24.5 / 39.3 against 15.7 / 27.0 / 42.2 us at 1 280 / 4 352 / 8 448
    positions and 32 x 80 heads); at 16 640 positions the decode step took the same time either way,
    and at batch 8 the two were within 5 %. With grouped KV heads each query head's program reads its
    group's keys again, and sdpa (enable_gqa) was up to 1.4x faster (32 query heads on 8 KV heads x
    128 at 8 448 positions: 31.4 against 23.8 us); docs/benchmarks.md."""
    return (batch == 1 or per_row) and heads == kv_heads and length <= DECODE_ATTENTION_MAX_KEYS


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, n_keys: Tensor, scale: float,
                     bias: Tensor | None = None) -> Tensor:
    """Attention of one query per sequence and head over a static KV buffer.

    q: (B, H, D); keys, values: (B, KV, L, D), H a multiple of KV; mask: (B, L) bool, True where a
    key may be attended to; n_keys: () int64 tensor, or (B,) one per sequence, no key at or after it is
    attended to (the Triton kernel does not read them); bias: `mask_bias(mask, q.dtype)` or None, used
    by the sdpa path in place of the mask. Returns (B, H, D).

    The split-KV Triton kernel runs where `split_kv_applies`; everything else goes to sdpa (cuDNN /
    flash)."""
    kernels = decode_kernels("attention_triton", q)
    if (kernels is not None
            and split_kv_applies(q.shape[0], q.shape[1], keys.shape[1], keys.shape[2], n_keys.dim() == 1)
            and keys.stride(-1) == 1 and values.stride(-1) == 1):
        return kernels.decode_attention(q.contiguous(), keys, values, mask, n_keys, scale)
    return decode_attention_ref(q, keys, values, mask, scale, bias)


def decode_attention_ref(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, scale: float,
                         bias: Tensor | None = None) -> Tensor:
    """`decode_attention` through sdpa (cuDNN / flash on CUDA): the kernel's twin."""
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values,
                                         attn_mask=bias if bias is not None else mask[:, None, None, :],
                                         scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, 0]


def attend(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slot: Tensor,
           n_keys: Tensor, heads: int, scale: float, bias: Tensor | None = None) -> Tensor:
    """An attention layer's decode step from its projection qkv (B, (H + 2 KV) D): `rope_kv` (the new
    key and value written at `slot`, shared () or per row (B,)), then `decode_attention` over the
    positions before `n_keys` (= slot + 1, passed in so that it is made once per step; the one-kernel
    path reads only `slot`).
    Returns (B, H, D) in qkv's dtype.

    Where the split-KV kernel runs (`split_kv_applies`) both happen in it (`attention_triton.attend_step`):
    the queries and the new key are rotated in registers and the new key attended to from them, which
    saves the rotary kernel's launch and a round trip of the queries through memory."""
    kernels = decode_kernels("attention_triton", qkv)
    if (kernels is not None and split_kv_applies(qkv.shape[0], heads, keys.shape[1], keys.shape[2], slot.dim() == 1)
            and qkv.dtype == keys.dtype == values.dtype and qkv.stride(-1) == 1 and cos.stride(-1) == 1
            and sin.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1):
        return kernels.attend_step(qkv, cos, sin, keys, values, mask, slot, heads, scale)
    return attend_ref(qkv, cos, sin, keys, values, mask, slot, n_keys, heads, scale, bias)


def attend_ref(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slot: Tensor,
               n_keys: Tensor, heads: int, scale: float, bias: Tensor | None = None) -> Tensor:
    """`attend` as `rope_kv` then `decode_attention` (each dispatching as usual): the one-kernel path's twin."""
    q = rope_kv(qkv, cos, sin, keys, values, slot, heads)
    return decode_attention(q.to(keys.dtype), keys, values, mask, n_keys, scale, bias=bias).to(qkv.dtype)
