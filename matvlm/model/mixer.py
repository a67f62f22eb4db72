"""`Mamba2Mixer`: a Mamba-2 token mixer that stands where a decoder layer's attention was.

Parameterisation (standard Mamba-2, parameter names as in MaTVLM's checkpoints):

    in_proj  : d_model -> [z | x | B | C | dt]   (d_inner, d_inner, G*N, G*N, H)
    conv1d   : depthwise causal conv, kernel d_conv, with bias, over [x | B | C], then SiLU
    dt       = softplus(dt_raw + dt_bias)            (H,)
    A        = -exp(A_log)                           (H,)
    y        = SSD(x, dt, A, B, C) + D * x
    y        = RMSNorm_grouped(y * silu(z)) * norm.weight   (group size d_inner / ngroups)
    out      = out_proj(y)

It is called exactly like the attention module it replaces,
`mixer(hidden_states, attention_mask=..., cache=..., **kwargs)` and returns
`(output, None)`, so the unchanged transformers decoder layer runs it. The cache keyword is
`cache` from transformers 5.24 on and `past_key_values` before; the mixer takes either.

Padding: positions whose padding-mask entry is 0 feed zeros into the conv and get
dt = 0, so they neither add to the state nor decay it. The padding mask is the 2-D
`attention_mask` the decoder stack was called with: decoder layers pass only a 4-D
(or no) mask down, so `model.hybrid` adds it to the decoder stack's keyword arguments
as `mamba_padding_mask`, which transformers forwards to every layer's mixer (also
when gradient checkpointing re-runs a layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..config import HybridConfig


def _upcast(t: Tensor) -> Tensor:
    """float32 for low-precision tensors (dt, A, D are kept in float32), float64 stays float64."""
    return t if t.dtype == torch.float64 else t.float()


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of channels of y * silu(z) (Mamba-2, norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        return ops.gated_rmsnorm(y, z, self.weight, self.eps, self.group_size)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer for decoder layer `layer_idx`, configured by `cfg` (a `HybridConfig`)."""

    def __init__(self, cfg: HybridConfig, layer_idx: int):
        super().__init__()
        self.cfg = cfg
        self.layer_idx = layer_idx
        self.nheads, self.headdim = cfg.nheads, cfg.headdim
        self.ngroups, self.d_state = cfg.ngroups, cfg.d_state
        self.d_inner, self.d_conv = cfg.d_inner, cfg.d_conv

        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.in_proj_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, kernel_size=cfg.d_conv,
                                groups=cfg.conv_dim, padding=0, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(cfg.nheads))
        self.A_log = nn.Parameter(torch.empty(cfg.nheads))
        self.D = nn.Parameter(torch.ones(cfg.nheads))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // cfg.ngroups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=cfg.out_proj_bias)
        self.reset_ssm_parameters()

    # --- init ----------------------------------------------------------------------

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Standard Mamba-2 init of dt_bias, A_log and D (arXiv 2405.21060; mamba_ssm's Mamba2):
        dt ~ logUniform[dt_min, dt_max] (floored), dt_bias = softplus^-1(dt);
        A ~ Uniform[a_init_min, a_init_max], A_log = log A; D = 1."""
        c = self.cfg
        device = self.dt_bias.device
        if device.type == "meta":
            return
        dt = torch.exp(torch.rand(c.nheads, device=device) * (math.log(c.dt_max) - math.log(c.dt_min))
                       + math.log(c.dt_min)).clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))          # inverse softplus
        self.A_log.copy_(torch.log(torch.empty(c.nheads, device=device).uniform_(c.a_init_min, c.a_init_max)))
        self.D.fill_(1.0)

    # --- pieces ----------------------------------------------------------------------

    def split_projection(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., in_proj_dim) -> z (..., d_inner), xBC (..., conv_dim), dt (..., H)."""
        return torch.split(zxbcdt, [self.d_inner, self.cfg.conv_dim, self.nheads], dim=-1)

    def split_xbc(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., d_inner), B (..., G*N), C (..., G*N)."""
        gn = self.ngroups * self.d_state
        return torch.split(xBC, [self.d_inner, gn, gn], dim=-1)

    def causal_conv(self, xBC: Tensor, conv_state: Tensor | None) -> Tensor:
        """Depthwise causal conv + SiLU. xBC: (B, T, C); conv_state: (B, C, d_conv-1) holding the
        previous d_conv-1 inputs, or None for zeros. Returns (B, T, C)."""
        return ops.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state)

    # --- forward ---------------------------------------------------------------------

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, cache=None,
                past_key_values=None, **kwargs) -> tuple[Tensor, None]:
        """hidden_states: (B, T, d_model); `cache` (or, before transformers 5.24, `past_key_values`):
        the generation cache or None. Returns ((B, T, d_model), None)."""
        from .cache import cache_from, mamba_state_for   # late import: cache imports this module's config

        b, t, _ = hidden_states.shape
        cache = cache_from(cache, past_key_values, kwargs, f"the Mamba-2 mixer of layer {self.layer_idx}")
        state = mamba_state_for(cache, self.layer_idx) if cache is not None else None
        if state is not None and state.initialized and t == 1:      # decode: the new token is real
            # (no padding check here: it would cost a device sync per layer and step; callers that
            # continue a prefill in chunks keep chunks holding padding longer than one token)
            return self._step(hidden_states, state), None
        pad = self._padding_mask(kwargs.get("mamba_padding_mask", attention_mask), b, t)  # (B, T) or None
        return self._full(hidden_states, pad, state), None

    @staticmethod
    def _padding_mask(mask: Tensor | None, b: int, t: int) -> Tensor | None:
        """The (B, T) bool mask of real tokens for this call, or None when all are real.
        `mask` is a 2-D mask over the whole sequence so far (B, past + T); others are ignored.
        On a GPU the mask is kept even when it holds no padding: asking would make the host wait for the
        device at every Mamba layer of every forward (a distillation step's student and align passes), and
        multiplying by ones changes nothing."""
        if mask is None or mask.dim() != 2:
            return None
        mask = mask[:, -t:].bool()
        if mask.shape != (b, t):
            raise ValueError(f"padding mask of shape {tuple(mask.shape)} does not fit the batch ({b}, {t})")
        if mask.is_cuda:
            return mask
        return None if bool(mask.all()) else mask

    def _full(self, u: Tensor, pad: Tensor | None, state) -> Tensor:
        b, t, _ = u.shape
        z, xBC, dt_raw = self.split_projection(self.in_proj(u))
        if pad is not None:
            xBC = xBC * pad[..., None].to(xBC.dtype)                  # pads feed zeros to the conv
        raw_xBC = xBC
        has_prev = state is not None and state.initialized
        xBC = self.causal_conv(xBC, state.conv if has_prev else None)
        x, B, C = self.split_xbc(xBC)
        dt = F.softplus(_upcast(dt_raw) + _upcast(self.dt_bias))        # (B, T, H)
        if pad is not None:
            dt = dt * pad[..., None]                                  # pads leave the state alone
        A = -torch.exp(_upcast(self.A_log))                            # (H,)
        y, final = ops.ssd(
            x.reshape(b, t, self.nheads, self.headdim),               # (B, T, H, P)
            dt,
            A,
            B.reshape(b, t, self.ngroups, self.d_state),              # (B, T, G, N)
            C.reshape(b, t, self.ngroups, self.d_state),
            _upcast(self.D),
            initial_state=state.ssm if has_prev else None,
        )
        if state is not None:
            state.store(raw_xBC, final, self.d_conv - 1)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        return self.out_proj(y)

    def _step(self, u: Tensor, state) -> Tensor:
        y = self.step_projected(self.in_proj(u[:, 0]), state)        # (B, d_inner)
        return self.out_proj(y[:, None])

    def step_projected(self, zxbcdt: Tensor, state) -> Tensor:
        """One decode step from the input projection (B, in_proj_dim): updates `state`, returns the
        gated, normed SSM output (B, d_inner) that `out_proj` maps back (the engine's fused decode
        step runs the projections itself)."""
        y = ops.mamba_step(zxbcdt, state.conv, state.ssm, self.conv1d.weight[:, 0], self.conv1d.bias, self.dt_bias,
                           self.A_log, self.D, self.norm.weight, self.norm.eps, self.ngroups)
        state.advance(1)
        return y
