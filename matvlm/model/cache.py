"""The hybrid cache: KV for attention layers, conv + SSM state for Mamba-2 layers.

`HybridCache` is a `transformers.Cache` whose layers are transformers' own
`DynamicLayer` for attention layers and `MambaLayerState` for Mamba layers, so the
unchanged attention modules and `generate` use it as any other cache.

Why not `DynamicCache(config)` with `layer_types`: the linear-attention layer
classes and the way `DynamicCache` reads `layer_types` changed between the
transformers releases we support (5.17 .. 5.2x), and the engine needs states it can
pre-allocate at fixed addresses (CUDA graphs) and a sequence length even when every
layer is a Mamba layer. `MambaLayerState` still derives from transformers'
`LinearAttentionCacheLayerMixin`, so masking and generation utilities recognise it
as a linear-attention layer.

`mamba_state_for(cache, i)` also accepts a cache that was built without knowing the
layout (e.g. the `DynamicCache()` that `generate` makes by default): it installs a
`MambaLayerState` at index i on first use.

The cache's keyword: transformers 5.24 renamed the `past_key_values` argument of every
model, decoder layer and attention module to `cache` (the old name still works with a
FutureWarning until 5.40). A mixer that kept reading `past_key_values` got no cache from
5.24's decoder layers and ran every decode step as a fresh one-token sequence. So the
name is never hard-coded: `cache_kwarg(module)` reads it off the module's own `forward`
signature (a documented interface), `cache_from(...)` takes the cache under either name,
and a cache that arrives under a name matvlm does not know is an error, not a silent
cache-less decode.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer, LinearAttentionCacheLayerMixin

from ..config import HybridConfig


class MambaLayerState(LinearAttentionCacheLayerMixin):
    """Conv state (B, conv_dim, d_conv-1) of the last raw conv inputs and SSM state (B, H, P, N)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__(number_of_states=1)
        self.seen = 0

    # transformers' generic bookkeeping reads `conv_states[0]` / `recurrent_states[0]`.
    @property
    def conv(self) -> Tensor:
        return self.conv_states[0]

    @property
    def ssm(self) -> Tensor:
        return self.recurrent_states[0]

    @property
    def initialized(self) -> bool:
        return bool(self.has_previous_state[0])

    @property
    def batch_size(self) -> int:
        return self.conv.shape[0]

    def allocate(self, batch: int, conv_dim: int, width: int, nheads: int, headdim: int, d_state: int,
                 dtype: torch.dtype, device) -> None:
        """Pre-allocate zero states (for static, CUDA-graph friendly use)."""
        self.conv_states[0] = torch.zeros(batch, conv_dim, width, dtype=dtype, device=device)
        self.recurrent_states[0] = torch.zeros(batch, nheads, headdim, d_state, dtype=torch.float32,
                                               device=device)
        self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
        self.device, self.dtype = device, dtype

    def store(self, raw_xbc: Tensor, final_state: Tensor, width: int) -> None:
        """After a forward over T tokens: keep the last `width` raw conv inputs and the final state.

        raw_xbc: (B, T, conv_dim) conv inputs (padding already zeroed); final_state: (B, H, P, N).
        """
        # only the last `width` inputs are copied: concatenating the whole (B, C, T) prompt first was the
        # largest kernel of a 16K-token prefill (1.4 of 4.2 ms on an H100, docs/benchmarks.md)
        new = raw_xbc[:, -width:].transpose(1, 2)                      # (B, C, min(T, width))
        prev = self.conv if self.initialized else new.new_zeros(new.shape[0], new.shape[1], width)
        window = torch.cat([prev.to(new.dtype), new], dim=-1)[..., -width:]   # (B, C, width)
        if self.is_conv_states_initialized[0] and self.conv.shape == window.shape:
            self.conv.copy_(window)                                    # keep a static address
            self.ssm.copy_(final_state)
        else:
            self.conv_states[0] = window.contiguous()
            self.recurrent_states[0] = final_state.contiguous()          # float32 (float64 in tests)
            self.is_conv_states_initialized[0] = self.is_recurrent_states_initialized[0] = True
            self.device, self.dtype = new.device, new.dtype
        self.has_previous_state[0] = True
        self.advance(raw_xbc.shape[1])

    def advance(self, tokens: int) -> None:
        """Count `tokens` more positions seen (what `get_seq_length` reports)."""
        self.seen += tokens

    # --- the abstract API of LinearAttentionCacheLayerMixin (not used by matvlm's mixer) ---

    def lazy_initialization(self, conv_states=None, recurrent_states=None, state_idx: int = 0, **kwargs):
        if conv_states is not None:
            self.conv_states[state_idx] = torch.zeros_like(conv_states)
            self.is_conv_states_initialized[state_idx] = True
        if recurrent_states is not None:
            self.recurrent_states[state_idx] = torch.zeros_like(recurrent_states)
            self.is_recurrent_states_initialized[state_idx] = True

    def update_conv_state(self, conv_states: Tensor, state_idx: int = 0, **kwargs) -> Tensor:
        self.conv_states[state_idx] = conv_states
        self.is_conv_states_initialized[state_idx] = True
        return conv_states

    def update_recurrent_state(self, recurrent_states: Tensor, state_idx: int = 0, **kwargs) -> Tensor:
        self.recurrent_states[state_idx] = recurrent_states
        self.is_recurrent_states_initialized[state_idx] = True
        return recurrent_states

    # --- what transformers' Cache calls on every layer ---------------------------------

    def reset(self) -> None:
        super().reset()
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.initialized:
            self.conv_states[0] = self.conv.repeat_interleave(repeats, dim=0)
            self.recurrent_states[0] = self.ssm.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.initialized:
            self.conv_states[0] = self.conv[indices]
            self.recurrent_states[0] = self.ssm[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a Mamba-2 state cannot be rolled back (crop); re-run the prefix instead")


class HybridCache(Cache):
    """Cache for a hybrid decoder: `DynamicLayer` for attention layers, `MambaLayerState` for Mamba."""

    def __init__(self, cfg: HybridConfig):
        mamba = set(cfg.mamba_layers)
        layers = [MambaLayerState() if i in mamba else DynamicLayer() for i in range(cfg.n_layer)]
        super().__init__(layers=layers)
        self.hybrid_config = cfg

    def _first_attention(self) -> int | None:
        return next((i for i, layer in enumerate(self.layers) if not isinstance(layer, MambaLayerState)), None)

    def _attention_or_mamba(self, layer_idx: int) -> int:
        if isinstance(self.layers[layer_idx], MambaLayerState):
            attn = self._first_attention()
            return layer_idx if attn is None else attn
        return layer_idx

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if layer_idx >= len(self.layers):
            return 0
        return self.layers[self._attention_or_mamba(layer_idx)].get_seq_length()

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        idx = self._attention_or_mamba(layer_idx)
        layer = self.layers[idx]
        if isinstance(layer, MambaLayerState):                         # no attention layer at all
            q = query_length if isinstance(query_length, int) else query_length.shape[0]
            return layer.seen + q, 0
        return layer.get_mask_sizes(query_length)


def mamba_state_for(cache, layer_idx: int) -> MambaLayerState | None:
    """The `MambaLayerState` of `layer_idx` in `cache`, installed if the cache has none there."""
    if not isinstance(cache, Cache):
        return None
    layers = cache.layers
    while len(layers) <= layer_idx:                                    # lazily-grown DynamicCache
        layers.append(DynamicLayer())
    if not isinstance(layers[layer_idx], MambaLayerState):
        layers[layer_idx] = MambaLayerState()
    return layers[layer_idx]


CACHE_KWARGS = ("cache", "past_key_values")   # transformers >= 5.24, and before


def cache_kwarg(module) -> str:
    """The keyword under which `module.forward` (a transformers model, decoder layer or attention)
    takes the generation cache: `cache` from transformers 5.24 on, `past_key_values` before."""
    return _cache_kwarg(type(module))


@functools.lru_cache(maxsize=None)
def _cache_kwarg(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(f"{cls.__name__}.forward takes neither `cache` nor `past_key_values`: "
                    f"this transformers release passes the cache in a way matvlm does not know")


def cache_from(cache, past_key_values, kwargs: dict, where: str):
    """The cache a module was called with, under whichever name the caller used (`cache` or
    `past_key_values`); a transformers `Cache` under any other keyword raises, naming it."""
    if cache is None:
        cache = past_key_values
    if cache is None:
        for name, value in kwargs.items():
            if isinstance(value, Cache):
                raise TypeError(f"{where} got the generation cache as `{name}`, a keyword matvlm does not know "
                                f"(expected `cache` or `past_key_values`); use a transformers release in the "
                                f"range matvlm's install pins")
    return cache
