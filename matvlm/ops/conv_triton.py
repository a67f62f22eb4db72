"""Triton kernel of `ops.conv.causal_conv1d` for prefill: the Mamba-2 mixer's depthwise causal convolution
and its SiLU, read and written in the (B, T, C) layout the projections produce.

The PyTorch path transposes the input to (B, C, T), pads or concatenates the cached inputs, runs
`nn.Conv1d` with one group per channel and transposes back: several full copies of a (T, 7 680) tensor
at TinyLLaVA's shapes besides the convolution, and the layer's prefill spent about 5 of its 7.1 ms at
16K tokens outside the scan and the projections (docs/benchmarks.md). Here one program computes a tile of
(positions x channels): for each of the d_conv taps it loads the tile's rows shifted back by the tap (from
the cached previous inputs before position 0), accumulates in float32, applies SiLU and stores once.
For training, `causal_conv1d_train` pairs that forward with a backward of two kernels: the first recomputes the
pre-activation a, forms g = dy * silu'(a) and each tile's partial sums of g (the bias's gradient) and of
g * x shifted by each tap (the weight's), the second gathers dx[t] = Σ_k w[k] g[t + K-1-k]. F.conv1d's
backward for one group per channel took 0.69 ms per call at SmolLM2's distillation shapes on an H100 (a
cutlass kernel, besides the transposes), 16 % of the step's time outside the matmuls (docs/benchmarks.md).
Its twin is `ops.conv.causal_conv1d_ref`; the tests check the kernels against it and float64 in Triton's
interpreter. Imported only when triton is installed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _preact(x_ptr, w_ptr, b_ptr, s_ptr, b, t, c, T, C, sx_b, sx_t, sw_c, ss_b, ss_c, K: tl.constexpr,
            HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """bias + Σ_k w[k] x[t - (K-1) + k] over a tile of (positions t x channels c), in float32."""
    in_c = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=in_c, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        w = tl.load(w_ptr + c * sw_c + k, mask=in_c, other=0.0).to(tl.float32)
        src = t - (K - 1) + k                                  # the input position this tap reads
        rows = (src >= 0) & (src < T)
        v = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + c[None, :], mask=rows[:, None] & in_c[None, :],
                    other=0.0).to(tl.float32)
        if HAS_STATE:                                          # before position 0: the cached inputs
            old = (src < 0) & (t < T)
            v += tl.load(s_ptr + b * ss_b + c[None, :] * ss_c + (K - 1 + src)[:, None],
                         mask=old[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        acc += v * w[None, :]
    return acc


@triton.jit
def _causal_conv(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, T, C, sx_b, sx_t, sw_c, ss_b, ss_c, sy_b, sy_t,
                 K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = _preact(x_ptr, w_ptr, b_ptr, s_ptr, b, t, c, T, C, sx_b, sx_t, sw_c, ss_b, ss_c, K, HAS_STATE, HAS_BIAS,
                  BLOCK_T, BLOCK_C)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & (c < C)[None, :])


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None,
                  silu: bool = True, block_t: int = 64, block_c: int = 128) -> Tensor:
    """x: (B, T, C) with unit stride along C; weight: (C, K); bias: (C,) or None; initial_state: (B, C, K-1),
    the K-1 inputs before x (zeros when None). Returns (B, T, C), contiguous, in x's dtype."""
    bsz, t, c = x.shape
    k = weight.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    y = torch.empty((bsz, t, c), dtype=x.dtype, device=x.device)
    if bsz * t == 0:
        return y
    s = initial_state if initial_state is not None else x
    grid = (bsz, triton.cdiv(t, block_t), triton.cdiv(c, block_c))
    _causal_conv[grid](x, weight, bias if bias is not None else weight, s, y, t, c, x.stride(0), x.stride(1),
                       weight.stride(0), s.stride(0) if initial_state is not None else 0,
                       s.stride(1) if initial_state is not None else 0, y.stride(0), y.stride(1),
                       K=k, HAS_STATE=initial_state is not None, HAS_BIAS=bias is not None, SILU=silu,
                       BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return y


@triton.jit
def _conv_grad_pre(x_ptr, w_ptr, b_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr, T, C, n_t, sx_b, sx_t, sw_c, sdy_b, sdy_t,
                   K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_T: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """g = dy * act'(a) for a tile, stored (B, T, C) in float32; the tile's Σ_t g (bias) and Σ_t g * x[t-K+1+k]
    (weight) stored at row (b * n_t + tile) of the partial-sum buffers."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < C
    in_t = t < T
    a = _preact(x_ptr, w_ptr, b_ptr, x_ptr, b, t, c, T, C, sx_b, sx_t, sw_c, 0, 0, K, False, HAS_BIAS, BLOCK_T,
                BLOCK_C)
    mask = in_t[:, None] & in_c[None, :]
    g = tl.load(dy_ptr + b * sdy_b + t[:, None] * sdy_t + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(a)
        g = g * sig * (1.0 + a * (1.0 - sig))
    g = tl.where(mask, g, 0.0)
    tl.store(g_ptr + (b * T + t[:, None]) * C + c[None, :], g, mask=mask)
    row = b * n_t + tile
    tl.store(db_ptr + row * C + c, tl.sum(g, 0), mask=in_c)
    for k in tl.static_range(K):                               # the inputs again: L2 holds the tile
        src = t - (K - 1) + k
        v = tl.load(x_ptr + b * sx_b + src[:, None] * sx_t + c[None, :],
                    mask=((src >= 0) & (src < T))[:, None] & in_c[None, :], other=0.0).to(tl.float32)
        tl.store(dw_ptr + (row * C + c) * K + k, tl.sum(g * v, 0), mask=in_c)


@triton.jit
def _conv_grad_x(g_ptr, w_ptr, dx_ptr, T, C, sw_c, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dx[t] = Σ_k w[k] g[t + K-1-k] (g float32 (B, T, C); dx (B, T, C) contiguous)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    in_c = c < C
    acc = tl.zeros((BLOCK_T, BLOCK_C), tl.float32)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + c * sw_c + k, mask=in_c, other=0.0).to(tl.float32)
        dst = t + (K - 1) - k                                  # the output position this tap fed
        v = tl.load(g_ptr + (b * T + dst[:, None]) * C + c[None, :], mask=(dst < T)[:, None] & in_c[None, :],
                    other=0.0)
        acc += v * w[None, :]
    tl.store(dx_ptr + (b * T + t[:, None]) * C + c[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & in_c[None, :])


def causal_conv1d_backward(x: Tensor, weight: Tensor, bias: Tensor | None, dy: Tensor, silu: bool = True,
                           block_t: int = 64, block_c: int = 128) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of `causal_conv1d(x, weight, bias, None, silu)` for the output gradient dy: (dx in x's dtype,
    (B, T, C) contiguous; dweight (C, K) and dbias (C,) or None, float32)."""
    bsz, t, c = x.shape
    k = weight.shape[1]
    if x.stride(2) != 1:
        x = x.contiguous()
    if dy.stride(2) != 1:
        dy = dy.contiguous()
    n_t = triton.cdiv(t, block_t)
    g = torch.empty((bsz, t, c), dtype=torch.float32, device=x.device)
    dw = torch.empty((bsz * n_t, c, k), dtype=torch.float32, device=x.device)
    db = torch.empty((bsz * n_t, c), dtype=torch.float32, device=x.device)
    dx = torch.empty((bsz, t, c), dtype=x.dtype, device=x.device)
    if bsz * t == 0:
        return dx, torch.zeros((c, k), device=x.device), torch.zeros(c, device=x.device) if bias is not None else None
    grid = (bsz, n_t, triton.cdiv(c, block_c))
    _conv_grad_pre[grid](x, weight, bias if bias is not None else weight, dy, g, dw, db, t, c, n_t, x.stride(0),
                         x.stride(1), weight.stride(0), dy.stride(0), dy.stride(1), K=k, HAS_BIAS=bias is not None,
                         SILU=silu, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    _conv_grad_x[grid](g, weight, dx, t, c, weight.stride(0), K=k, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    return dx, dw.sum(0), db.sum(0) if bias is not None else None


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return causal_conv1d(x, weight, bias, None, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = causal_conv1d_backward(x, weight, bias, dy, ctx.silu)
        return dx, dw.to(weight.dtype), db.to(bias.dtype) if bias is not None else None, None


def causal_conv1d_train(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool = True) -> Tensor:
    """`causal_conv1d` without cached inputs, differentiable in x, weight and bias through the kernels above."""
    return _CausalConv.apply(x, weight, bias, silu)
