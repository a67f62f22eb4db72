"""Triton kernel of `ops.mamba_decode.mamba_step`: a Mamba-2 layer's decode step after its input
projection (conv update, SiLU, softplus, SSM state update, D skip, gated RMSNorm), one program per
(sequence, group). Registered as a custom op; its PyTorch twin is `ops.mamba_decode.mamba_step_ref`.
Imported only when triton is installed.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import dependent_launch
from .pdl_triton import after_previous, launch_options


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
                BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    after_previous(PDL)
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
        num_warps=warps, **launch_options(dependent_launch(zxbcdt)))
    return y


@mamba_step.register_fake
def _(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D, norm_weight, eps, ngroups):
    return zxbcdt.new_empty((zxbcdt.shape[0], ssm_state.shape[1] * ssm_state.shape[2]))
