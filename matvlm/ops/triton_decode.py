"""Triton kernels for decode steps: a matrix-vector product for a few rows, and one-query attention.

At batch 1 a decode step is a stream of weight matrices through matrix-vector products; on an H100
cuBLAS reads TinyLLaVA's (2560 x 2560 ... 51200 x 2560) bf16 weights at 1.6-2.7 TB/s, these kernels
at 1.9-3.0 TB/s (docs/benchmarks.md). Both are registered as custom ops (`torch.library.custom_op`),
which `torch.compile` calls as opaque kernels between the element-wise work it fuses (as a
`triton_op`, whose source inductor analyses, compiling the step with dynamic shapes did not finish
in minutes), and both are checked against float64 references by `python -m matvlm.bench.kernels`.

- `gemv(x, w, bias, residual)`: y = x @ w.T (+ bias) (+ residual) for x of at most 16 rows, one
  program per block of output features reading whole rows of `w` (16-byte loads along K), float32
  accumulation. One row uses element-wise products; 2-16 rows use the matrix units on a 16-row tile.
- `decode_attention(q, keys, values, mask, n_keys, scale)`: softmax(q k^T * scale) v for one query
  per (sequence, head) over a static KV buffer, split along the keys (flash-decoding): every split
  keeps a running max, sum and weighted values, and a second kernel combines the splits. Only the
  first `n_keys` positions (a device scalar: the cache's slot + 1) are read, so a CUDA graph captured
  once serves every step while reading only the keys written so far.

Imported only when triton is installed; `matvlm.ops` falls back to PyTorch otherwise.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor



def _gemv_configs(small_rows: bool) -> list[triton.Config]:
    if small_rows:      # (block of output features, block of K, warps, pipeline stages), H100-tuned
        grid = [(4, 1024, 8, 1), (4, 1024, 4, 2), (8, 256, 4, 1), (8, 256, 4, 3), (16, 256, 8, 3), (8, 512, 4, 1)]
    else:
        grid = [(32, 512, 4, 4), (32, 256, 4, 3), (64, 128, 4, 3), (32, 128, 4, 4), (64, 256, 4, 3)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s) for n, k, w, s in grid]


NORMS = {None: 0, "layer": 1, "rms": 2}
ACTS = {None: 0, "gelu_tanh": 1, "gelu": 2, "silu_mul": 3}


@triton.jit
def _activate(t_ptrs, kt, t_half, ok, ACT: tl.constexpr):
    """The tail's inputs at columns kt (0 where not ok): act(t) or, for silu_mul, silu(t[kt]) * t[kt + half]."""
    t = tl.load(t_ptrs + kt, mask=ok, other=0.0).to(tl.float32)
    if ACT == 1:      # tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        t = t * tl.sigmoid(1.5957691216057308 * (t + 0.044715 * t * t * t))
    elif ACT == 2:
        t = 0.5 * t * (1.0 + tl.math.erf(t * 0.7071067811865476))
    elif ACT == 3:
        u = tl.load(t_ptrs + t_half + kt, mask=ok, other=0.0).to(tl.float32)
        t = t * tl.sigmoid(t) * u
    return t


@triton.autotune(configs=_gemv_configs(True), key=["N", "K", "K1"])
@triton.jit
def _gemv_one_row(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, N, K1, K, t_half, stride_w, eps,
                  NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mean = 0.0
    rstd = 1.0
    if NORM != 0:                                   # statistics of the K1 head columns, two passes
        s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        if NORM == 1:
            for k0 in range(0, K1, BLOCK_K):
                s1 += tl.load(x_ptr + k0 + rk, mask=k0 + rk < K1, other=0.0).to(tl.float32)
            mean = tl.sum(s1, axis=0) / K1
        s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K1, BLOCK_K):
            d = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K1, other=0.0).to(tl.float32) - mean
            s2 += tl.where(k0 + rk < K1, d * d, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=0) / K1 + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        head = kk < K1
        x = tl.load(x_ptr + kk, mask=head, other=0.0).to(tl.float32)
        if NORM != 0:
            x = (x - mean) * rstd * tl.load(nw_ptr + kk, mask=head, other=0.0).to(tl.float32)
            if NORM == 1:
                x += tl.load(nb_ptr + kk, mask=head, other=0.0).to(tl.float32)
        if ACT != 0:
            x = tl.where(head, x, _activate(t_ptr, kk - K1, t_half, (kk >= K1) & (kk < K), ACT))
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(configs=_gemv_configs(False), key=["N", "K", "K1"])
@triton.jit
def _gemv_few_rows(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, M, N, K1, K, t_half,
                   stride_x, stride_t, stride_w, stride_r, stride_y, eps,
                   NORM: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, 16)
    rk = tl.arange(0, BLOCK_K)
    rows = rm[:, None] < M
    mean = tl.zeros((16,), dtype=tl.float32)
    rstd = tl.full((16,), 1.0, tl.float32)
    if NORM != 0:
        if NORM == 1:
            s1 = tl.zeros((16, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K1, BLOCK_K):
                s1 += tl.load(x_ptr + rm[:, None] * stride_x + k0 + rk[None, :],
                              mask=rows & (k0 + rk[None, :] < K1), other=0.0).to(tl.float32)
            mean = tl.sum(s1, axis=1) / K1
        s2 = tl.zeros((16, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K1, BLOCK_K):
            inside = rows & (k0 + rk[None, :] < K1)
            d = tl.load(x_ptr + rm[:, None] * stride_x + k0 + rk[None, :], mask=inside, other=0.0).to(tl.float32)
            d = d - mean[:, None]
            s2 += tl.where(inside, d * d, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(s2, axis=1) / K1 + eps)
    acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        head = kk[None, :] < K1
        x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=rows & head, other=0.0).to(tl.float32)
        if NORM != 0:
            x = (x - mean[:, None]) * rstd[:, None] * tl.load(nw_ptr + kk, mask=kk < K1, other=0.0).to(tl.float32)[None, :]
            if NORM == 1:
                x += tl.load(nb_ptr + kk, mask=kk < K1, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            tail = rows & (kk[None, :] >= K1) & (kk[None, :] < K)
            x = tl.where(head, x, _activate(t_ptr + rm[:, None] * stride_t, kk[None, :] - K1, t_half, tail, ACT))
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    keep = rows & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + rm[:, None] * stride_r + rn[None, :], mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=keep)


@torch.library.custom_op("matvlm::gemv", mutates_args=())
def gemv(x: Optional[Tensor], w: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
         tail: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
         eps: float = 1e-5, norm: int = 0, act: int = 0) -> Tensor:
    """y = [norm(x) | act(tail)] @ w.T (+ bias) (+ residual), for at most 16 rows.

    x: (M, K1) or None (K1 = 0), rows contiguous; tail: (M, K - K1) or, for act silu_mul, (M, 2 (K - K1)),
    or None; w: (N, K) with unit stride along K; bias: (N,); residual: (M, N). norm (NORMS): 0 none,
    1 LayerNorm(norm_weight, norm_bias, eps), 2 RMSNorm(norm_weight, eps), over x's K1 columns;
    act (ACTS): 0 none, 1 tanh-GELU, 2 erf-GELU, 3 silu(first half) * second half. Returns (M, N) in w's
    dtype, accumulated in float32."""
    return launch_gemv(x, w, bias, residual, tail, norm_weight, norm_bias, eps, norm, act)


def launch_gemv(x, w, bias, residual, tail, norm_weight, norm_bias, eps, norm, act, config: dict | None = None):
    """`gemv`'s launcher; `config` ({"BLOCK_N", "BLOCK_K"}) bypasses the autotuner (tests, interpreter)."""
    src = x if x is not None else tail
    m = src.shape[0]
    k1 = x.shape[1] if x is not None else 0
    n, k = w.shape
    t_half = (k - k1) if act == 3 else 0
    y = torch.empty((m, n), dtype=w.dtype, device=w.device)
    xx = x if x is not None else src
    tt = tail if tail is not None else src
    b = bias if bias is not None else w
    r = residual if residual is not None else y
    nw = norm_weight if norm_weight is not None else w
    nb = norm_bias if norm_bias is not None else w
    flags = dict(NORM=norm, ACT=act, HAS_BIAS=bias is not None, HAS_RES=residual is not None)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    one, few = (_gemv_one_row, _gemv_few_rows) if config is None else (_gemv_one_row.fn, _gemv_few_rows.fn)
    flags.update(config or {})
    if m == 1:
        one[grid](xx, tt, w, b, r, y, nw, nb, n, k1, k, t_half, w.stride(0), eps, **flags)
    else:
        few[grid](xx, tt, w, b, r, y, nw, nb, m, n, k1, k, t_half, xx.stride(0), tt.stride(0),
                  w.stride(0), r.stride(0), y.stride(0), eps, **flags)
    return y


@gemv.register_fake
def _(x, w, bias=None, residual=None, tail=None, norm_weight=None, norm_bias=None, eps=1e-5, norm=0, act=0):
    src = x if x is not None else tail
    return w.new_empty((src.shape[0], w.shape[0]))


@triton.jit
def _attention_split(q_ptr, k_ptr, v_ptr, mask_ptr, n_ptr, m_out, l_out, acc_out, scale,
                     H, GROUP, D, SPLIT_LEN,
                     sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                     BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    n_keys = tl.load(n_ptr)
    rd = tl.arange(0, BLOCK_D)
    dmask = rd < D
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rd, mask=dmask, other=0.0).to(tl.float32) * scale
    m_i = tl.full((), -1e30, tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_keys)
    for start in range(lo, hi, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        inside = offs < hi
        ok = tl.load(mask_ptr + b * sm_b + offs, mask=inside, other=0) != 0
        kv_mask = inside[:, None] & dmask[None, :]
        k = tl.load(k_ptr + b * sk_b + kvh * sk_h + offs[:, None] * sk_l + rd[None, :], mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
        s = tl.where(ok & inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_ptr + b * sv_b + kvh * sv_h + offs[:, None] * sv_l + rd[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    n_splits = tl.num_programs(1)
    tl.store(m_out + bh * n_splits + split, m_i)
    tl.store(l_out + bh * n_splits + split, l_i)
    tl.store(acc_out + (bh * n_splits + split) * BLOCK_D + rd, acc)


@triton.jit
def _attention_combine(m_in, l_in, acc_in, o_ptr, H, D, so_b, so_h,
                       SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rs = tl.arange(0, SPLITS)
    rd = tl.arange(0, BLOCK_D)
    m = tl.load(m_in + bh * SPLITS + rs)
    l = tl.load(l_in + bh * SPLITS + rs)
    acc = tl.load(acc_in + (bh * SPLITS + rs)[:, None] * BLOCK_D + rd[None, :])
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + rd, out.to(o_ptr.dtype.element_ty), mask=rd < D)


def _splits(heads: int, sms: int) -> int:
    """Key splits per (sequence, head): four to eight programs per SM for one sequence (32 for 32 heads
    on an H100, the best of 8-64 measured at 1 280 positions). A function of the model and device
    only, so that a compiled step serves every batch size and cache length."""
    return min(triton.next_power_of_2(max(1, -(-4 * sms // heads))), 64)


@torch.library.custom_op("matvlm::decode_attention", mutates_args=())
def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, n_keys: Tensor, scale: float) -> Tensor:
    """One query per (sequence, head). q: (B, H, D); keys, values: (B, KV, L, D) with unit stride along
    D (H a multiple of KV); mask: (B, L) bool, True where a key may be attended to; n_keys: () int64,
    keys at and after it are not read. Returns (B, H, D) in q's dtype."""
    return launch_attention(q, keys, values, mask, n_keys, scale,
                            torch.cuda.get_device_properties(q.device).multi_processor_count)


def launch_attention(q, keys, values, mask, n_keys, scale, sms: int):
    """`decode_attention`'s launcher, for a device of `sms` multiprocessors."""
    bsz, heads, d = q.shape
    kv, length = keys.shape[1], keys.shape[2]
    block_d = triton.next_power_of_2(d)
    splits = _splits(heads, sms)
    split_len = (length + 64 * splits - 1) // (64 * splits) * 64        # whole 64-key blocks per split
    m = torch.empty((bsz * heads, splits), dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    acc = torch.empty((bsz * heads, splits, block_d), dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _attention_split[(bsz * heads, splits)](
        q, keys, values, mask, n_keys, m, l, acc, scale, heads, heads // kv, d, split_len,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
        BLOCK_L=64, BLOCK_D=block_d, num_warps=2)
    _attention_combine[(bsz * heads,)](
        m, l, acc, out, heads, d, out.stride(0), out.stride(1), SPLITS=splits, BLOCK_D=block_d, num_warps=1)
    return out


@decode_attention.register_fake
def _(q, keys, values, mask, n_keys, scale):
    return torch.empty_like(q)


@triton.jit
def _rope_kv(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, H, KV, D, R,
             s_qkv, s_cs, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)                        # 0..H-1: queries, H..H+KV-1: keys (and their values)
    rd = tl.arange(0, BLOCK_D)
    half = R // 2
    row = qkv_ptr + b * s_qkv + head * D           # keys follow the queries in the projection
    x = tl.load(row + rd, mask=rd < D, other=0.0).to(tl.float32)
    rot = rd < R
    partner = tl.where(rd < half, rd + half, rd - half)
    other = tl.load(row + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + b * s_cs + rd, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * s_cs + rd, mask=rot, other=0.0).to(tl.float32)
    x = tl.where(rot, x * cos + tl.where(rd < half, -other, other) * sin, x)
    if head < H:
        tl.store(q_ptr + b * sq_b + head * sq_h + rd, x.to(q_ptr.dtype.element_ty), mask=rd < D)
    else:
        slot = tl.load(slot_ptr)
        kv = head - H
        tl.store(k_ptr + b * sk_b + kv * sk_h + slot * sk_l + rd, x.to(k_ptr.dtype.element_ty), mask=rd < D)
        v = tl.load(qkv_ptr + b * s_qkv + (H + KV + kv) * D + rd, mask=rd < D, other=0.0)
        tl.store(v_ptr + b * sv_b + kv * sv_h + slot * sv_l + rd, v.to(v_ptr.dtype.element_ty), mask=rd < D)


@torch.library.custom_op("matvlm::rope_kv", mutates_args=("keys", "values"))
def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slot: Tensor, heads: int) -> Tensor:
    """Rotary embedding (rotate-half) of the first R channels of each query and key head, and the keys
    and values written into the cache at `slot`. qkv: (B, (H + 2 KV) D) with rows contiguous; cos, sin:
    (B, R) with unit stride; keys, values: (B, KV, L, D); slot: () int64. Returns the queries (B, H, D)."""
    bsz = qkv.shape[0]
    kv, d = keys.shape[1], keys.shape[3]
    q = torch.empty((bsz, heads, d), dtype=qkv.dtype, device=qkv.device)
    _rope_kv[(bsz, heads + kv)](qkv, cos, sin, q, keys, values, slot, heads, kv, d, cos.shape[1],
                                qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
                                keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2),
                                BLOCK_D=triton.next_power_of_2(d), num_warps=1)
    return q


@rope_kv.register_fake
def _(qkv, cos, sin, keys, values, slot, heads):
    return qkv.new_empty((qkv.shape[0], heads, keys.shape[3]))
