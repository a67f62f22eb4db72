"""Triton kernel of `ops.conv.causal_conv1d` for prefill: the Mamba-2 mixer's depthwise causal convolution
and its SiLU, read and written in the (B, T, C) layout the projections produce.

The PyTorch path transposes the input to (B, C, T), pads or concatenates the cached inputs, runs
`nn.Conv1d` with one group per channel and transposes back: several full copies of a (T, 7 680) tensor
at TinyLLaVA's shapes besides the convolution, and the layer's prefill spent about 5 of its 7.1 ms at
16K tokens outside the scan and the projections (docs/benchmarks.md). Here one program computes a tile of
(positions x channels): for each of the d_conv taps it loads the tile's rows shifted back by the tap (from
the cached previous inputs before position 0), accumulates in float32, applies SiLU and stores once.
Forward only (inference prefill); training keeps the PyTorch path. Its twin is `ops.conv.causal_conv1d_ref`;
the tests check the kernel against it in Triton's interpreter. Imported only when triton is installed.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _causal_conv(x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, T, C, sx_b, sx_t, sw_c, ss_b, ss_c, sy_b, sy_t,
                 K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
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
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + b * sy_b + t[:, None] * sy_t + c[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & in_c[None, :])


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
