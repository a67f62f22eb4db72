"""Triton kernels for decode steps: a matrix-vector product for a few rows, rotary + cache write,
one-query attention, and a Mamba-2 layer's step.

At batch 1 a decode step is a stream of weight matrices through matrix-vector products; on an H100
cuBLAS reads TinyLLaVA's (2560 x 2560 ... 51200 x 2560) bf16 weights at 1.6-2.7 TB/s, these kernels
at 1.9-3.0 TB/s (docs/benchmarks.md). All are registered as custom ops (`torch.library.custom_op`),
which `torch.compile` calls as opaque kernels between the element-wise work it fuses (as a
`triton_op`, whose source inductor analyses, compiling the step with dynamic shapes did not finish
in minutes), and all are checked against float64 references by `python -m matvlm.bench.kernels`.

- `gemv(x, w, bias, residual)`: y = x @ w.T (+ bias) (+ residual) for x of at most 16 rows, one
  program per block of output features reading whole rows of `w` (16-byte loads along K), float32
  accumulation. One row uses element-wise products; 2-16 rows use the matrix units on a 16-row tile.
- `decode_attention(q, keys, values, mask, n_keys, scale)`: softmax(q k^T * scale) v for one query
  per (sequence, head) over a static KV buffer, split along the keys (flash-decoding): every split
  keeps a running max, sum and weighted values, and a second kernel combines the splits. Only the
  first `n_keys` positions (a device scalar: the cache's slot + 1) are read, so a CUDA graph captured
  once serves every step while reading only the keys written so far.
- `rope_kv(qkv, cos, sin, keys, values, slot, heads)`: rotary embedding of the queries and keys, and
  the keys and values written into the cache at `slot`.
- `attend_step(qkv, cos, sin, keys, values, mask, slot, heads, scale)`: both of the above in the
  split-KV kernel: queries and the new key rotated in registers, the new key and value written at
  `slot` and attended to from registers.
- `mamba_step(zxbcdt, conv_state, ssm_state, ...)`: a Mamba-2 layer's step after its input
  projection (conv update, SSM state update, gated RMSNorm), one program per (sequence, group).

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
MAX_STATS_BLOCK = 8192      # widest x whose norm statistics the one-row kernel takes from one load
ACTS = {None: 0, "gelu_tanh": 1, "gelu": 2, "silu_mul": 3}


@triton.jit
def _gelu(t, ACT: tl.constexpr):
    """float32 t through tanh-GELU (ACT 1) or erf-GELU (ACT 2)."""
    if ACT == 1:      # tanh approximation: 0.5 x (1 + tanh(u)) = x sigmoid(2u)
        t = t * tl.sigmoid(1.5957691216057308 * (t + 0.044715 * t * t * t))
    elif ACT == 2:
        t = 0.5 * t * (1.0 + tl.math.erf(t * 0.7071067811865476))
    return t


@triton.jit
def _activate(t_ptrs, kt, t_half, ok, ACT: tl.constexpr):
    """The tail's inputs at columns kt (0 where not ok): t (ACT 0), act(t), or for silu_mul silu(t[kt]) * t[kt + half]."""
    t = tl.load(t_ptrs + kt, mask=ok, other=0.0).to(tl.float32)
    if ACT == 3:
        u = tl.load(t_ptrs + t_half + kt, mask=ok, other=0.0).to(tl.float32)
        t = t * tl.sigmoid(t) * u
    else:
        t = _gelu(t, ACT)
    return t


@triton.autotune(configs=_gemv_configs(True), key=["N", "K", "K1"])
@triton.jit
def _gemv_one_row(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, N, K1, K, t_half, stride_w, eps, N_ACT,
                  NORM: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr, HAS_TAIL: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_X: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mean = 0.0
    rstd = 1.0
    if NORM != 0 and BLOCK_X > 0:                   # statistics of the K1 head columns from one load
        rx = tl.arange(0, BLOCK_X)
        xs = tl.load(x_ptr + rx, mask=rx < K1, other=0.0).to(tl.float32)
        if NORM == 1:
            mean = tl.sum(xs, axis=0) / K1
        d = tl.where(rx < K1, xs - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / K1 + eps)
    elif NORM != 0:                                 # two passes over blocks of K
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
        if HAS_TAIL:
            x = tl.where(head, x, _activate(t_ptr, kk - K1, t_half, (kk >= K1) & (kk < K), ACT))
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if OUT_ACT != 0:
        y = tl.where(rn >= N_ACT, _gelu(y, OUT_ACT), y)
    if HAS_RES:
        y += tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(configs=_gemv_configs(False), key=["N", "K", "K1"])
@triton.jit
def _gemv_few_rows(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, M, N, K1, K, t_half,
                   stride_x, stride_t, stride_w, stride_r, stride_y, eps, N_ACT,
                   NORM: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr, HAS_TAIL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
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
        if HAS_TAIL:
            tail = rows & (kk[None, :] >= K1) & (kk[None, :] < K)
            x = tl.where(head, x, _activate(t_ptr + rm[:, None] * stride_t, kk[None, :] - K1, t_half, tail, ACT))
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.0)
        acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
    keep = rows & (rn[None, :] < N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if OUT_ACT != 0:
        acc = tl.where(rn[None, :] >= N_ACT, _gelu(acc, OUT_ACT), acc)
    if HAS_RES:
        acc += tl.load(r_ptr + rm[:, None] * stride_r + rn[None, :], mask=keep, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=keep)


@torch.library.custom_op("matvlm::gemv", mutates_args=())
def gemv(x: Optional[Tensor], w: Tensor, bias: Optional[Tensor] = None, residual: Optional[Tensor] = None,
         tail: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None, norm_bias: Optional[Tensor] = None,
         eps: float = 1e-5, norm: int = 0, act: int = 0, out_act: int = 0, out_act_from: int = 0) -> Tensor:
    """y = [norm(x) | act(tail)] @ w.T (+ bias) (+ residual), for at most 16 rows, with out_act applied to
    output features from `out_act_from` on (before the residual).

    x: (M, K1) or None (K1 = 0), rows contiguous; tail: (M, K - K1) or, for act silu_mul, (M, 2 (K - K1)),
    or None; w: (N, K) with unit stride along K; bias: (N,); residual: (M, N). norm (NORMS): 0 none,
    1 LayerNorm(norm_weight, norm_bias, eps), 2 RMSNorm(norm_weight, eps), over x's K1 columns;
    act (ACTS): 0 none, 1 tanh-GELU, 2 erf-GELU, 3 silu(first half) * second half; out_act: 0, 1 or 2.
    Returns (M, N) in w's dtype, accumulated in float32."""
    return launch_gemv(x, w, bias, residual, tail, norm_weight, norm_bias, eps, norm, act, out_act, out_act_from)


def launch_gemv(x, w, bias, residual, tail, norm_weight, norm_bias, eps, norm, act, out_act=0, out_act_from=0,
                config: dict | None = None):
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
    flags = dict(NORM=norm, ACT=act, OUT_ACT=out_act, HAS_TAIL=tail is not None, HAS_BIAS=bias is not None,
                 HAS_RES=residual is not None)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    one, few = (_gemv_one_row, _gemv_few_rows) if config is None else (_gemv_one_row.fn, _gemv_few_rows.fn)
    flags.update(config or {})
    if m == 1:
        # the norm's statistics from one load of x where it fits in registers (one L2 round trip
        # before the weights stream, instead of two passes of K / BLOCK_K dependent loads)
        block_x = triton.next_power_of_2(k1) if norm and k1 <= MAX_STATS_BLOCK else 0
        one[grid](xx, tt, w, b, r, y, nw, nb, n, k1, k, t_half, w.stride(0), eps, out_act_from, BLOCK_X=block_x,
                  **flags)
    else:
        few[grid](xx, tt, w, b, r, y, nw, nb, m, n, k1, k, t_half, xx.stride(0), tt.stride(0),
                  w.stride(0), r.stride(0), y.stride(0), eps, out_act_from, **flags)
    return y


@gemv.register_fake
def _(x, w, bias=None, residual=None, tail=None, norm_weight=None, norm_bias=None, eps=1e-5, norm=0, act=0,
      out_act=0, out_act_from=0):
    src = x if x is not None else tail
    return w.new_empty((src.shape[0], w.shape[0]))


@triton.jit
def _rope_lanes(row, cs_row, sn_row, rd, R, D: tl.constexpr):
    """Lanes `rd` of one head's projection `row` in float32, the first R channels rotated (rotate-half:
    x cos + [-x2, x1] sin, cs_row / sn_row the (R,) cos and sin)."""
    half = R // 2
    x = tl.load(row + rd, mask=rd < D, other=0.0).to(tl.float32)
    rot = rd < R
    partner = tl.where(rd < half, rd + half, rd - half)
    other = tl.load(row + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(cs_row + rd, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(sn_row + rd, mask=rot, other=0.0).to(tl.float32)
    return tl.where(rot, x * cos + tl.where(rd < half, -other, other) * sin, x)


@triton.jit
def _attention_split(q_ptr, k_ptr, v_ptr, mask_ptr, n_ptr, cos_ptr, sin_ptr, m_buf, l_buf, acc_buf, scale,
                     H, KV, R, SPLIT_LEN, N_SPLITS,
                     sq_b, sq_h, s_cs, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_L: tl.constexpr,
                     APPEND: tl.constexpr):
    """One (split of the keys, sequence, head): running max, normaliser and weighted value sum of its
    keys. A head's D channels are two tiles, DA (the largest power of two <= D) and DB (the rest, padded
    to a power of two; unused where D == DA), so D = 80 reads 64 + 16 lanes instead of 128.

    APPEND=False: q_ptr is (B, H, D) queries; n_ptr holds the number of cache positions to read.
    APPEND=True: q_ptr is the step's projection (B, (H + 2 KV) D); the queries and the new key get the
    rotary embedding here, n_ptr holds the new token's slot, the cache is read below it, and the
    program whose split holds the slot takes the new key and value from registers (and, for the first
    query head of its KV group, writes them into the cache)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    group = H // KV
    kvh = h // group
    ra = tl.arange(0, DA)
    rb = DA + tl.arange(0, DB)                     # masked off entirely where D == DA
    row = q_ptr + b * sq_b
    cs_row = cos_ptr + b * s_cs
    sn_row = sin_ptr + b * s_cs
    n_keys = tl.load(n_ptr)                        # APPEND: the slot; cache positions below it are read
    if APPEND:
        q_a = _rope_lanes(row + h * sq_h, cs_row, sn_row, ra, R, D)
        q_b = _rope_lanes(row + h * sq_h, cs_row, sn_row, rb, R, D)
    else:
        q_a = tl.load(row + h * sq_h + ra).to(tl.float32)
        q_b = tl.load(row + h * sq_h + rb, mask=rb < D, other=0.0).to(tl.float32)
    # the queries as the cache stores keys (what the two-kernel path computes with), then scaled
    q_a = q_a.to(k_ptr.dtype.element_ty).to(tl.float32) * scale
    q_b = q_b.to(k_ptr.dtype.element_ty).to(tl.float32) * scale
    m_i = tl.full((), -1e30, tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc_a = tl.zeros((DA,), dtype=tl.float32)
    acc_b = tl.zeros((DB,), dtype=tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_keys)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    for start in range(lo, hi, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        inside = offs < hi
        k = tl.load(k_base + offs[:, None] * sk_l + ra[None, :], mask=inside[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q_a[None, :], axis=1)
        if D > DA:
            kb = tl.load(k_base + offs[:, None] * sk_l + rb[None, :], mask=inside[:, None] & (rb < D)[None, :],
                         other=0.0)
            s += tl.sum(kb.to(tl.float32) * q_b[None, :], axis=1)
        ok = tl.load(mask_ptr + b * sm_b + offs, mask=inside, other=0) != 0
        s = tl.where(ok & inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + offs[:, None] * sv_l + ra[None, :], mask=inside[:, None], other=0.0)
        acc_a = acc_a * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        if D > DA:
            vb = tl.load(v_base + offs[:, None] * sv_l + rb[None, :], mask=inside[:, None] & (rb < D)[None, :],
                         other=0.0)
            acc_b = acc_b * alpha + tl.sum(p[:, None] * vb.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if APPEND:
        if n_keys // SPLIT_LEN == split:           # this split holds the new token's slot
            k_row = row + (H + kvh) * D
            v_row = row + (H + KV + kvh) * D
            k_a = _rope_lanes(k_row, cs_row, sn_row, ra, R, D).to(k_ptr.dtype.element_ty)
            k_b = _rope_lanes(k_row, cs_row, sn_row, rb, R, D).to(k_ptr.dtype.element_ty)
            v_a = tl.load(v_row + ra).to(v_ptr.dtype.element_ty)
            v_b = tl.load(v_row + rb, mask=rb < D, other=0.0).to(v_ptr.dtype.element_ty)
            if h % group == 0:
                tl.store(k_base + n_keys * sk_l + ra, k_a)
                tl.store(k_base + n_keys * sk_l + rb, k_b, mask=rb < D)
                tl.store(v_base + n_keys * sv_l + ra, v_a)
                tl.store(v_base + n_keys * sv_l + rb, v_b, mask=rb < D)
            s1 = tl.sum(k_a.to(tl.float32) * q_a, axis=0) + tl.sum(k_b.to(tl.float32) * q_b, axis=0)
            s1 = tl.where(tl.load(mask_ptr + b * sm_b + n_keys) != 0, s1, float("-inf"))
            m_new = tl.maximum(m_i, s1)
            p1 = tl.exp(s1 - m_new)
            alpha = tl.exp(m_i - m_new)
            acc_a = acc_a * alpha + p1 * v_a.to(tl.float32)
            acc_b = acc_b * alpha + p1 * v_b.to(tl.float32)
            l_i = l_i * alpha + p1
            m_i = m_new
    tl.store(m_buf + bh * N_SPLITS + split, m_i)
    tl.store(l_buf + bh * N_SPLITS + split, l_i)
    tl.store(acc_buf + (bh * N_SPLITS + split) * D + ra, acc_a)
    tl.store(acc_buf + (bh * N_SPLITS + split) * D + rb, acc_b, mask=rb < D)


@triton.jit
def _attention_combine(m_buf, l_buf, acc_buf, o_ptr, H, N_SPLITS, so_b, so_h,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rs = tl.arange(0, BLOCK_S)
    live = rs < N_SPLITS
    rd = tl.arange(0, BLOCK_D)
    m = tl.load(m_buf + bh * N_SPLITS + rs, mask=live, other=-1e30)
    l = tl.load(l_buf + bh * N_SPLITS + rs, mask=live, other=0.0)
    acc = tl.load(acc_buf + (bh * N_SPLITS + rs)[:, None] * D + rd[None, :], mask=live[:, None] & (rd < D)[None, :],
                  other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + rd, out.to(o_ptr.dtype.element_ty), mask=rd < D)


def attention_plan(bsz: int, heads: int, length: int, sms: int) -> dict:
    """Launch parameters of the split-KV kernel for a (bsz, heads, length) buffer on `sms`
    multiprocessors: keys per program, the key block, warps (and, optionally, "stages" for the loop's
    software pipelining). One warp, 64-key blocks and about eight programs per SM, with the keys per
    program rounded up to a power of two, were the best plan of a sweep on an H100 at 1 280, 4 352,
    8 448 and 16 640 positions for one sequence of 32 heads x 80 (keys per program 64-1024, blocks
    16-128, 1-4 warps); one warp and 64-key blocks were also the best at head sizes 64 and 128
    (docs/benchmarks.md). A function of the buffer's shape, not of how many keys are written, so one
    CUDA graph serves every step."""
    block_l = 64
    per = max(1, 8 * sms // (bsz * heads))              # splits per (sequence, head)
    split_len = max(block_l, triton.next_power_of_2(-(-length // per)))
    return {"split_len": split_len, "block_l": block_l, "warps": 1}


@torch.library.custom_op("matvlm::decode_attention", mutates_args=())
def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, n_keys: Tensor, scale: float) -> Tensor:
    """One query per (sequence, head). q: (B, H, D); keys, values: (B, KV, L, D) with unit stride along
    D (H a multiple of KV); mask: (B, L) bool, True where a key may be attended to; n_keys: () int64,
    keys at and after it are not read. Returns (B, H, D) in q's dtype."""
    return launch_attention(q, keys, values, mask, n_keys, scale,
                            torch.cuda.get_device_properties(q.device).multi_processor_count)


def _lanes(d: int) -> tuple[int, int]:
    """The split kernel's two channel tiles for head size d: the largest power of two <= d, and the
    rest padded to a power of two (16, masked off, where there is no rest)."""
    da = 1 << (d.bit_length() - 1)
    return da, triton.next_power_of_2(d - da) if d > da else 16


def _split_and_combine(src, keys, values, mask, count, cos, sin, scale, heads, sq, sms, plan, append):
    """Launch the split kernel over `src` (queries, or the projection when `append`) and the combine
    kernel; returns (B, H, D) in src's dtype."""
    bsz, kv, length, d = keys.shape
    p = plan or attention_plan(bsz, heads, length, sms)
    da, db = _lanes(d)
    splits = -(-length // p["split_len"])
    m = torch.empty((bsz * heads, splits), dtype=torch.float32, device=src.device)
    l = torch.empty_like(m)
    acc = torch.empty((bsz * heads, splits, d), dtype=torch.float32, device=src.device)
    out = torch.empty((bsz, heads, d), dtype=src.dtype, device=src.device)
    _attention_split[(splits, bsz * heads)](
        src, keys, values, mask, count, cos, sin, m, l, acc, scale, heads, kv, cos.shape[-1], p["split_len"],
        splits, sq[0], sq[1], cos.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0),
        D=d, DA=da, DB=db, BLOCK_L=p["block_l"], APPEND=append, num_warps=p["warps"],
        **({"num_stages": p["stages"]} if "stages" in p else {}))
    _attention_combine[(bsz * heads,)](m, l, acc, out, heads, splits, out.stride(0), out.stride(1),
                                       D=d, BLOCK_S=triton.next_power_of_2(splits),
                                       BLOCK_D=triton.next_power_of_2(d), num_warps=1)
    return out


def launch_attention(q, keys, values, mask, n_keys, scale, sms: int, plan: dict | None = None):
    """`decode_attention`'s launcher, for a device of `sms` multiprocessors (`plan` overrides
    `attention_plan`)."""
    return _split_and_combine(q, keys, values, mask, n_keys, q, q, scale, q.shape[1], (q.stride(0), q.stride(1)),
                              sms, plan, False)


@decode_attention.register_fake
def _(q, keys, values, mask, n_keys, scale):
    return q.new_empty(q.shape)


@triton.jit
def _rope_kv(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, H, KV, D, R,
             s_qkv, s_cs, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)                        # 0..H-1: queries, H..H+KV-1: keys (and their values)
    rd = tl.arange(0, BLOCK_D)
    row = qkv_ptr + b * s_qkv + head * D           # keys follow the queries in the projection
    x = _rope_lanes(row, cos_ptr + b * s_cs, sin_ptr + b * s_cs, rd, R, D)
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


@torch.library.custom_op("matvlm::attend_step", mutates_args=("keys", "values"))
def attend_step(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slot: Tensor,
                heads: int, scale: float) -> Tensor:
    """`rope_kv` and then `decode_attention` over the cache positions up to and including `slot`, in
    one split kernel (and the combine): the queries and the new key are rotated in registers, the new
    key and value written at `slot` and attended to from registers. qkv: (B, (H + 2 KV) D) with rows
    contiguous; cos, sin: (B, R) with unit stride; keys, values: (B, KV, L, D) with unit stride along
    D; mask: (B, L) bool; slot: () int64, below L (not checked: it is a device scalar). Returns
    (B, H, D) in qkv's dtype."""
    return launch_attend(qkv, cos, sin, keys, values, mask, slot, heads, scale,
                         torch.cuda.get_device_properties(qkv.device).multi_processor_count)


def launch_attend(qkv, cos, sin, keys, values, mask, slot, heads, scale, sms: int, plan: dict | None = None):
    """`attend_step`'s launcher, for a device of `sms` multiprocessors (`plan` overrides
    `attention_plan`)."""
    return _split_and_combine(qkv, keys, values, mask, slot, cos, sin, scale, heads, (qkv.stride(0), keys.shape[3]),
                              sms, plan, True)


@attend_step.register_fake
def _(qkv, cos, sin, keys, values, mask, slot, heads, scale):
    return qkv.new_empty((qkv.shape[0], heads, keys.shape[3]))


@triton.jit
def _conv_silu(row_ptr, conv_ptr, cw_ptr, cb_ptr, ch, ok, sc_c, W: tl.constexpr):
    """Causal depthwise conv at one new position for channels `ch` (masked by `ok`), then SiLU.
    Returns the output (float32) and the values the conv state must hold next: the window without its
    oldest entry. The caller stores them after a barrier, once every thread has read the old state."""
    x_new = tl.load(row_ptr + ch, mask=ok, other=0.0).to(tl.float32)
    out = tl.load(cb_ptr + ch, mask=ok, other=0.0).to(tl.float32) + x_new * tl.load(
        cw_ptr + ch * W + (W - 1), mask=ok, other=0.0).to(tl.float32)
    for j in tl.static_range(W - 1):
        s = tl.load(conv_ptr + ch * sc_c + j, mask=ok, other=0.0).to(tl.float32)
        out += s * tl.load(cw_ptr + ch * W + j, mask=ok, other=0.0).to(tl.float32)
    return out * tl.sigmoid(out), x_new


@triton.jit
def _conv_shift(conv_ptr, ch, ok, x_new, sc_c, W: tl.constexpr):
    """Shift the conv state of channels `ch` by one position and append x_new."""
    for j in tl.static_range(W - 2):
        s = tl.load(conv_ptr + ch * sc_c + j + 1, mask=ok, other=0.0)
        tl.debug_barrier()
        tl.store(conv_ptr + ch * sc_c + j, s, mask=ok)
        tl.debug_barrier()
    tl.store(conv_ptr + ch * sc_c + (W - 2), x_new.to(conv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _mamba_step(in_ptr, conv_ptr, ssm_ptr, cw_ptr, cb_ptr, dtb_ptr, alog_ptr, dskip_ptr, nw_ptr, tmp_ptr, y_ptr,
                s_in, sc_b, sc_c, ss_b, ss_h, ss_p, s_tmp, s_y, eps, DI, GN, HPG,
                P: tl.constexpr, N: tl.constexpr, W: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    row = in_ptr + b * s_in                         # [z (DI) | x (DI) | B (GN) | C (GN) | dt (H)]
    conv = conv_ptr + b * sc_b                      # channels [x | B | C]
    xbc = row + DI
    rn = tl.arange(0, BLOCK_N)
    n_ok = rn < N
    B, b_new = _conv_silu(xbc, conv, cw_ptr, cb_ptr, DI + g * N + rn, n_ok, sc_c, W)
    C, c_new = _conv_silu(xbc, conv, cw_ptr, cb_ptr, DI + GN + g * N + rn, n_ok, sc_c, W)
    tl.debug_barrier()
    _conv_shift(conv, DI + g * N + rn, n_ok, b_new, sc_c, W)
    _conv_shift(conv, DI + GN + g * N + rn, n_ok, c_new, sc_c, W)
    rp = tl.arange(0, BLOCK_P)
    sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for i in range(0, HPG):
        h = g * HPG + i
        dt = tl.load(row + 2 * DI + 2 * GN + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))          # softplus, as torch's (threshold 20)
        decay = tl.exp(-tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * dt)
        d_skip = tl.load(dskip_ptr + h).to(tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + rp
            p_ok = p < P
            x, x_new = _conv_silu(xbc, conv, cw_ptr, cb_ptr, h * P + p, p_ok, sc_c, W)
            tl.debug_barrier()
            _conv_shift(conv, h * P + p, p_ok, x_new, sc_c, W)
            st_ptrs = ssm_ptr + b * ss_b + h * ss_h + p[:, None] * ss_p + rn[None, :]
            both = p_ok[:, None] & n_ok[None, :]
            st = tl.load(st_ptrs, mask=both, other=0.0).to(tl.float32)
            st = st * decay + (dt * x)[:, None] * B[None, :]
            tl.store(st_ptrs, st.to(ssm_ptr.dtype.element_ty), mask=both)
            y = tl.sum(st * C[None, :], axis=1) + d_skip * x
            z = tl.load(row + h * P + p, mask=p_ok, other=0.0).to(tl.float32)
            y = tl.where(p_ok, y * z * tl.sigmoid(z), 0.0)
            sq += y * y
            tl.store(tmp_ptr + b * s_tmp + h * P + p, y, mask=p_ok)
    rstd = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / (HPG * P) + eps)
    tl.debug_barrier()
    for c0 in range(0, HPG * P, BLOCK_P):
        c = g * HPG * P + c0 + rp
        c_ok = c0 + rp < HPG * P
        y = tl.load(tmp_ptr + b * s_tmp + c, mask=c_ok, other=0.0) * rstd
        y = y * tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * s_y + c, y.to(y_ptr.dtype.element_ty), mask=c_ok)


@torch.library.custom_op("matvlm::mamba_step", mutates_args=("conv_state", "ssm_state"))
def mamba_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
               dt_bias: Tensor, A_log: Tensor, D: Tensor, norm_weight: Tensor, eps: float, ngroups: int) -> Tensor:
    """A Mamba-2 mixer's whole decode step after its input projection, one program per (sequence,
    group): causal conv update + SiLU of [x | B | C], dt = softplus(dt + dt_bias), the SSM state update
    state = exp(dt A) state + dt x B^T, y = state C + D x, and RMSNorm(y * silu(z)) over the group's
    channels times norm_weight.

    zxbcdt: (B, 2 DI + 2 G N + H), rows with unit stride; conv_state: (B, DI + 2 G N, W - 1), unit
    stride along W; ssm_state: (B, H, P, N), unit stride along N, any float dtype; conv_weight:
    (DI + 2 G N, W) contiguous. Updates both states; returns (B, DI) in zxbcdt's dtype."""
    return launch_mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight,
                             eps, ngroups)


def launch_mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, eps,
                      ngroups, block_p: int = 128, warps: int = 4):
    """`mamba_step`'s launcher. The defaults were the fastest of block_p 16-128 x warps 2-8 on an H100 at
    TinyLLaVA's shapes (P = 80: the whole head in one block), batch 1 and 8."""
    bsz = zxbcdt.shape[0]
    _, heads, p, n = ssm_state.shape
    width = conv_weight.shape[1]
    gn = ngroups * n
    di = heads * p
    y = torch.empty((bsz, di), dtype=zxbcdt.dtype, device=zxbcdt.device)
    tmp = torch.empty((bsz, di), dtype=torch.float32, device=zxbcdt.device)
    _mamba_step[(bsz, ngroups)](
        zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, tmp, y,
        zxbcdt.stride(0), conv_state.stride(0), conv_state.stride(1), ssm_state.stride(0), ssm_state.stride(1),
        ssm_state.stride(2), tmp.stride(0), y.stride(0), eps, di, gn, heads // ngroups,
        P=p, N=n, W=width, BLOCK_P=min(block_p, triton.next_power_of_2(p)), BLOCK_N=triton.next_power_of_2(n),
        num_warps=warps)
    return y


@mamba_step.register_fake
def _(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, eps, ngroups):
    return zxbcdt.new_empty((zxbcdt.shape[0], ssm_state.shape[1] * ssm_state.shape[2]))
