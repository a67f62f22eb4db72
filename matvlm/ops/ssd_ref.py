"""Pure-PyTorch Mamba-2 scan (SSD): the reference every fast path is checked against.

The recurrence, per head h (A is a negative scalar per head, dt > 0):

    state_t = exp(dt_t · A) · state_{t-1} + dt_t · x_t ⊗ B_t        state: (P, N)
    y_t     = state_t · C_t + D · x_t                              y: (P,)

Heads are split into `ngroups` groups that share B and C (head h uses group
h // (nheads // ngroups)).

Three functions with one signature family:
- `ssd_sequential`: the recurrence above, one token at a time (the ground truth).
- `ssd_chunked`: the chunked "state-space dual" algorithm of the Mamba-2 paper
  (arXiv 2405.21060, §6): quadratic attention-like form inside chunks of Q tokens,
  the recurrence between chunks. Same outputs, O(T·Q) work, autograd-friendly.
- `ssd_step`: one decode step on a cached state, in place.

All computation runs in float32 (float64 if the inputs are float64) and the
output is returned in the dtype of `x`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  initial_state: Tensor | None) -> tuple[int, int, int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got shape {tuple(x.shape)}")
    b, t, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, t):
        raise ValueError(f"B must be (batch, seqlen, ngroups, dstate) = ({b}, {t}, G, N), got {tuple(B.shape)}")
    g, n = B.shape[2:]
    if C.shape != B.shape:
        raise ValueError(f"C must have the shape of B {tuple(B.shape)}, got {tuple(C.shape)}")
    if h % g != 0:
        raise ValueError(f"ngroups ({g}) must divide nheads ({h})")
    if dt.shape != (b, t, h):
        raise ValueError(f"dt must be (batch, seqlen, nheads) = ({b}, {t}, {h}), got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be (nheads,) = ({h},), got {tuple(A.shape)}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be (nheads,) = ({h},), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be (batch, nheads, headdim, dstate) = ({b}, {h}, {p}, {n}), "
                         f"got {tuple(initial_state.shape)}")
    return b, t, h, p, g, n


def _heads(bc: Tensor, nheads: int) -> Tensor:
    """(..., G, N) -> (..., H, N): repeat each group's B or C for the heads of that group."""
    g = bc.shape[-2]
    return bc.repeat_interleave(nheads // g, dim=-2) if g != nheads else bc


def ssd_sequential(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                   initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence.

    Args:
        x: (B, T, H, P) inputs; dt: (B, T, H) positive step sizes; A: (H,) negative decays;
        B, C: (B, T, G, N); D: (H,) skip or None; initial_state: (B, H, P, N) or None.
    Returns:
        y: (B, T, H, P) in x's dtype, final_state: (B, H, P, N) in the compute dtype.
    """
    b, t, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
    cd = _compute_dtype(x)
    x, dt, A = x.to(cd), dt.to(cd), A.to(cd)
    Bh, Ch = _heads(B.to(cd), h), _heads(C.to(cd), h)              # (B, T, H, N)
    state = (torch.zeros(b, h, p, n, dtype=cd, device=x.device) if initial_state is None
             else initial_state.to(cd))
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * A)                               # (B, H)
        state = (state * decay[..., None, None]
                 + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, i, :, None, :])  # (B, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, i]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)    # (B, T, H, P)
    if D is not None:
        y = y + x * D.to(cd)[:, None]
    return y, state


def ssd_chunked(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
                initial_state: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """Chunked SSD; same arguments and results as `ssd_sequential`.

    Any length works: the sequence is padded to a multiple of `chunk_size` with
    dt = 0 and x = 0, which leaves the state untouched (decay exp(0) = 1, no input).
    """
    b, t, h, p, g, n = _check_shapes(x, dt, A, B, C, D, initial_state)
    out_dtype = x.dtype
    cd = _compute_dtype(x)
    x, dt, A, B, C = x.to(cd), dt.to(cd), A.to(cd), B.to(cd), C.to(cd)
    q = chunk_size
    pad = (-t) % q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (t + pad) // q
    hg = h // g                                                       # heads per group
    # Split heads as (G, H/G) so B and C broadcast over the heads of their group.
    xc = x.view(b, nc, q, g, hg, p)                                   # (B, c, Q, G, hg, P)
    dtc = dt.view(b, nc, q, g, hg)                                    # (B, c, Q, G, hg)
    Bc = B.view(b, nc, q, g, n)                                       # (B, c, Q, G, N)
    Cc = C.view(b, nc, q, g, n)
    a = dtc * A.view(g, hg)                                           # (B, c, Q, G, hg) log-decays
    acs = torch.cumsum(a, dim=2)                                      # inclusive cumsum in the chunk

    # 1. Inside each chunk: y_i += sum_{j<=i} (C_i·B_j) exp(acs_i - acs_j) dt_j x_j.
    seg = acs[:, :, :, None] - acs[:, :, None, :]                     # (B, c, Qi, Qj, G, hg)
    causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
    decay_ij = torch.exp(seg.masked_fill(~causal[:, :, None, None], float("-inf")))
    cb = torch.einsum("bcign,bcjgn->bcijg", Cc, Bc)                   # (B, c, Qi, Qj, G)
    w = cb[..., None] * decay_ij * dtc[:, :, None]                    # (B, c, Qi, Qj, G, hg)
    y = torch.einsum("bcijgh,bcjghp->bcighp", w, xc)                  # (B, c, Q, G, hg, P)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(acs[:, :, -1:] - acs)                    # (B, c, Q, G, hg)
    chunk_states = torch.einsum("bcjgh,bcjghp,bcjgn->bcghpn",
                                decay_to_end * dtc, xc, Bc)           # (B, c, G, hg, P, N)

    # 3. Carry states across chunks (a short sequential loop over chunks).
    state = (torch.zeros(b, g, hg, p, n, dtype=cd, device=x.device) if initial_state is None
             else initial_state.to(cd).view(b, g, hg, p, n))
    chunk_decay = torch.exp(acs[:, :, -1])                            # (B, c, G, hg)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = state * chunk_decay[:, c, ..., None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)                         # (B, c, G, hg, P, N)

    # 4. The state entering each chunk, read out by C_i and decayed to position i.
    y = y + torch.einsum("bcign,bcghpn,bcigh->bcighp", Cc, start_states, torch.exp(acs))

    y = y.reshape(b, nc * q, h, p)[:, :t]                             # (B, T, H, P)
    if D is not None:
        y = y + x[:, :t] * D.to(cd)[:, None]
    return y.to(out_dtype), state.reshape(b, h, p, n)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None) -> Tensor:
    """One recurrence step; updates `state` in place and returns y.

    Args:
        state: (B, H, P, N), updated in place; x: (B, H, P); dt: (B, H) positive;
        A: (H,); B, C: (B, G, N); D: (H,) or None.
    Returns:
        y: (B, H, P) in x's dtype.
    """
    h = x.shape[1]
    cd = torch.float64 if state.dtype == torch.float64 else torch.float32
    xf, dtf = x.to(cd), dt.to(cd)
    Bh, Ch = _heads(B.to(cd), h), _heads(C.to(cd), h)                 # (B, H, N)
    decay = torch.exp(dtf * A.to(cd))                                 # (B, H)
    new = (state.to(cd) * decay[..., None, None]
           + (dtf[..., None] * xf)[..., None] * Bh[:, :, None, :])    # (B, H, P, N)
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + xf * D.to(cd)[:, None]
    return y.to(x.dtype)


def gated_rmsnorm_ref(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm over groups of `group_size` channels of x · silu(z), times weight (Mamba-2's
    gated norm with norm_before_gate=False).

    Args:
        x, z: (..., D); weight: (D,); D divisible by group_size.
    """
    cd = _compute_dtype(x)
    y = x.to(cd) * F.silu(z.to(cd))
    shape = y.shape
    yg = y.view(*shape[:-1], shape[-1] // group_size, group_size)     # (..., D/g, g)
    yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + eps)
    return (yg.view(shape) * weight.to(cd)).to(x.dtype)
