"""Initialise a Mamba-2 mixer from the attention it replaces (paper §3.2, Eq. 4-6).

Removing the softmax (and the 1/sqrt(d) scale) turns attention into the linear RNN
h_n = h_{n-1} + K_n^T V_n, y_n = Q_n h_n, which is Mamba-2's SSM with decay 1, so

    x rows <- W_V,   B rows <- W_K,   C rows <- W_Q,   out_proj <- W_O

per head (nheads = ngroups = attention heads, headdim = d_state = head_dim); grouped-query
K/V heads are repeated to one per query head. Biases follow the weights when the mixer
has them. The z and dt rows, conv, dt_bias, A_log and D keep the standard Mamba-2 init.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import HybridConfig
from ..model.hybrid import AttentionNames
from ..model.mixer import Mamba2Mixer


def in_proj_rows(mixer: Mamba2Mixer) -> dict[str, slice]:
    """Named row ranges of the fused in_proj: z, x, B, C, dt."""
    di, gn, h = mixer.d_inner, mixer.ngroups * mixer.d_state, mixer.nheads
    bounds = {"z_rows": di, "x_rows": di, "B_rows": gn, "C_rows": gn, "dt_rows": h}
    out, start = {}, 0
    for name, size in bounds.items():
        out[name] = slice(start, start + size)
        start += size
    return out


def _per_query_head(t: Tensor, kv_heads: int, heads: int) -> Tensor:
    """Rows (kv_heads*hd, ...) -> (heads*hd, ...), each K/V head repeated for its query heads."""
    hd = t.shape[0] // kv_heads
    return t.reshape(kv_heads, hd, *t.shape[1:]).repeat_interleave(heads // kv_heads, dim=0).reshape(
        heads * hd, *t.shape[1:])


@torch.no_grad()
def init_from_attention(mixer: Mamba2Mixer, attn: nn.Module, names: AttentionNames, heads: int,
                        kv_heads: int) -> None:
    """Copy W_V, W_K, W_Q (and biases) into the x, B, C rows of `mixer.in_proj` and W_O into out_proj."""
    if mixer.nheads != heads or mixer.ngroups != heads:
        raise ValueError(f"mixer has nheads={mixer.nheads}, ngroups={mixer.ngroups}; attention init needs both "
                         f"equal to the attention's {heads} heads")
    rows = in_proj_rows(mixer)
    q, k, v, o = (getattr(attn, n) for n in (names.q, names.k, names.v, names.o))
    src = {"x_rows": (v, kv_heads), "B_rows": (k, kv_heads), "C_rows": (q, heads)}
    for part, (lin, n_src) in src.items():
        mixer.in_proj.weight[rows[part]] = _per_query_head(lin.weight, n_src, heads).to(mixer.in_proj.weight)
        if mixer.in_proj.bias is not None:
            b = lin.bias if lin.bias is not None else torch.zeros(lin.out_features, device=lin.weight.device)
            mixer.in_proj.bias[rows[part]] = _per_query_head(b, n_src, heads).to(mixer.in_proj.bias)
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[rows["z_rows"]] = 0
        mixer.in_proj.bias[rows["dt_rows"]] = 0
    mixer.out_proj.weight.copy_(o.weight)
    if mixer.out_proj.bias is not None:
        mixer.out_proj.bias.copy_(o.bias if o.bias is not None else torch.zeros_like(mixer.out_proj.bias))


def hybridize(model: nn.Module, layers: list[int] | HybridConfig, seed: int | None = None, init: bool = True,
              **overrides) -> dict[int, nn.Module]:
    """Make `model` a hybrid in place: the attention of decoder layers `layers` (or those of a ready
    `HybridConfig`) becomes Mamba-2 mixers, initialised from it (Eq. 4-6) unless `init` is False (their
    weights are loaded afterwards). `seed` seeds the random parts of the init; `overrides` go to
    `hybrid_config_for` (e.g. `source=`). The one way every caller turns a model into a hybrid.

    Returns:
        {layer index: the attention module it replaced} (the teacher view swaps these back in).
    """
    from ..model.hybrid import attention_names, attention_shape, hybrid_config_for, make_hybrid

    cfg = layers if isinstance(layers, HybridConfig) else hybrid_config_for(model, list(layers), **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    replaced = make_hybrid(model, cfg)
    if init and replaced:
        names = attention_names(model.config)
        heads, kv_heads, _ = attention_shape(model.config)
        for i, attn in replaced.items():
            init_from_attention(model.mamba_mixers[i], attn, names, heads, kv_heads)
    return replaced
