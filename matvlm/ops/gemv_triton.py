"""Triton kernel of `ops.gemv.linear` for decode steps: y = [norm(x) | act(tail)] @ w.T (+ bias) (+ residual)
for x of at most 16 rows, one program per block of output features reading whole rows of `w` (16-byte
loads along K), float32 accumulation. One row uses element-wise products; 2-16 rows use the matrix
units on a 16-row tile.

At batch 1 a decode step is a stream of weight matrices through matrix-vector products; on an H100
cuBLAS reads TinyLLaVA's (2560 x 2560 ... 51200 x 2560) bf16 weights at 1.6-2.7 TB/s, this kernel at
1.9-3.0 TB/s (docs/benchmarks.md). Registered as a custom op (`torch.library.custom_op`), which
`torch.compile` calls as an opaque kernel between the element-wise work it fuses (as a `triton_op`,
whose source inductor analyses, compiling the step with dynamic shapes did not finish in minutes).
Its PyTorch twin is `ops.gemv.linear_ref`; `matvlm bench-kernels` checks it against float64 and the
tests against the twin in Triton's interpreter. Imported only when triton is installed.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import dependent_launch
from .pdl_triton import after_previous, launch_options


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


@triton.autotune(configs=_gemv_configs(True), key=["N", "K", "K1", "PDL"])
@triton.jit
def _gemv_one_row(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, N, K1, K, t_half, stride_w, eps, N_ACT,
                  NORM: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr, HAS_TAIL: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_X: tl.constexpr, PDL: tl.constexpr,
                  PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rn[:, None] * stride_w
    n_ok = rn[:, None] < N
    if PREFETCH:    # the weights depend on no earlier kernel: the first block's loads go out before the wait
        w = tl.load(w_rows + rk[None, :], mask=n_ok & (rk[None, :] < K), other=0.0)
    after_previous(PDL)
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
        if PREFETCH:                                # this block came with the last iteration; load the next
            acc += w.to(tl.float32) * x[None, :]
            nxt = kk + BLOCK_K                      # past K on the last iteration: masked, nothing read
            w = tl.load(w_rows + nxt[None, :], mask=n_ok & (nxt[None, :] < K), other=0.0)
        else:
            wk = tl.load(w_rows + kk[None, :], mask=n_ok & (kk[None, :] < K), other=0.0)
            acc += wk.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    if OUT_ACT != 0:
        y = tl.where(rn >= N_ACT, _gelu(y, OUT_ACT), y)
    if HAS_RES:
        y += tl.load(r_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)


@triton.autotune(configs=_gemv_configs(False), key=["N", "K", "K1", "PDL"])
@triton.jit
def _gemv_few_rows(x_ptr, t_ptr, w_ptr, b_ptr, r_ptr, y_ptr, nw_ptr, nb_ptr, M, N, K1, K, t_half,
                   stride_x, stride_t, stride_w, stride_r, stride_y, eps, N_ACT,
                   NORM: tl.constexpr, ACT: tl.constexpr, OUT_ACT: tl.constexpr, HAS_TAIL: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    after_previous(PDL)
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
    """`gemv`'s launcher; `config` ({"BLOCK_N", "BLOCK_K"}, and for one row optionally "PREFETCH") bypasses the
    autotuner (tests, interpreter)."""
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
                 HAS_RES=residual is not None, **launch_options(dependent_launch(w)))

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]),)

    one, few = (_gemv_one_row, _gemv_few_rows) if config is None else (_gemv_one_row.fn, _gemv_few_rows.fn)
    flags.update(config or {})
    if m == 1:
        # the norm's statistics from one load of x where it fits in registers (one L2 round trip
        # before the weights stream, instead of two passes of K / BLOCK_K dependent loads)
        block_x = triton.next_power_of_2(k1) if norm and k1 <= MAX_STATS_BLOCK else 0
        # the first block of weights before the wait for the kernel before: under PDL, where that overlaps
        prefetch = flags.pop("PREFETCH", flags["PDL"])
        one[grid](xx, tt, w, b, r, y, nw, nb, n, k1, k, t_half, w.stride(0), eps, out_act_from, BLOCK_X=block_x,
                  PREFETCH=prefetch, **flags)
    else:
        flags.pop("PREFETCH", None)
        few[grid](xx, tt, w, b, r, y, nw, nb, m, n, k1, k, t_half, xx.stride(0), tt.stride(0),
                  w.stride(0), r.stride(0), y.stride(0), eps, out_act_from, **flags)
    return y


@gemv.register_fake
def _(x, w, bias=None, residual=None, tail=None, norm_weight=None, norm_bias=None, eps=1e-5, norm=0, act=0,
      out_act=0, out_act_from=0):
    src = x if x is not None else tail
    return w.new_empty((src.shape[0], w.shape[0]))
