"""The engine's pre-allocated caches: every buffer at a fixed address, so a decode step can be captured
as a CUDA graph. KV buffers for attention layers (`BufferKVLayer`: the static cache writes every row at
one shared slot counter, `StaticKVLayer`; the continuous batcher's pool writes each row at its own
position, `SlotKVLayer`), and Mamba-2 conv + SSM states (`StaticMambaState`). They are transformers
`Cache` layers, so the model's own decoder layers read and write them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from ..model.cache import MambaLayerState
from ..model.hybrid import attention_shape


class BufferKVLayer(CacheLayerMixin):
    """KV buffers (B, kv_heads, L, head_dim) allocated up front; subclasses say where new entries go.
    `visible` (prefill): return only the first `visible` positions."""

    is_compileable = True
    is_sliding = False

    def __init__(self, keys: Tensor, values: Tensor, visible: int | None = None):
        super().__init__()
        self.keys, self.values, self.visible = keys, values, visible
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front
        return None

    def _visible(self) -> tuple[Tensor, Tensor]:
        if self.visible is not None:
            return self.keys[:, :, :self.visible], self.values[:, :, :self.visible]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[2], 0

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticKVLayer(BufferKVLayer):
    """KV buffers (B, kv_heads, L, head_dim) written at the cache's shared slot counter."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device, slot: Tensor):
        keys = torch.zeros(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
        super().__init__(keys, torch.zeros_like(keys))
        self.slot = slot

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        idx = self.slot + torch.arange(key_states.shape[-2], device=self.keys.device)        # (T,)
        self.keys.index_copy_(2, idx, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, idx, value_states.to(self.values.dtype))
        return self._visible()

    def get_seq_length(self) -> int:
        return int(self.slot)

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()


class StaticMambaState(MambaLayerState):
    """A Mamba layer's state in the static cache: the cache's `slot` tensor counts positions, so decode
    steps keep no Python counter (which a compiled step would have to re-check on every call)."""

    def advance(self, tokens: int) -> None:
        return None


class StaticHybridCache(Cache):
    """Pre-allocated cache for `batch` sequences of up to `length` tokens; `slot` is the next write index."""

    def __init__(self, model: nn.Module, batch: int, length: int, dtype, device):
        cfg = model.hybrid_config
        _, kv, head_dim = attention_shape(model.config)
        self.slot = torch.zeros((), dtype=torch.long, device=device)
        layers = []
        for i in range(cfg.n_layer):
            if i in cfg.mamba_layers:
                state = StaticMambaState()
                state.allocate(batch, cfg.conv_dim, cfg.d_conv - 1, cfg.nheads, cfg.headdim, cfg.d_state, dtype, device)
                layers.append(state)
            else:
                layers.append(StaticKVLayer(batch, kv, length, head_dim, dtype, device, self.slot))
        super().__init__(layers=layers)
        self.batch, self.length = batch, length

    def tensors(self) -> list[Tensor]:
        out = [self.slot]
        for layer in self.layers:
            if isinstance(layer, StaticKVLayer):
                out += [layer.keys, layer.values]
            else:
                out += [layer.conv, layer.ssm]
        return out

    def step_state(self) -> list[Tensor]:
        """What a decode step changes besides the KV entries at and after `slot` (which no later step
        reads before writing them): the slot and the Mamba layers' states."""
        return [self.slot] + [t for layer in self.layers if isinstance(layer, MambaLayerState)
                              for t in (layer.conv, layer.ssm)]

    def set_visible(self, n: int | None) -> None:
        """Prefill: attention layers see only the first `n` cache positions (None: the whole buffer, as
        decode steps, whose shapes must not change, do)."""
        for layer in self.layers:
            if isinstance(layer, StaticKVLayer):
                layer.visible = n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def clear(self) -> None:
        self.slot.zero_()
        for layer in self.layers:
            if isinstance(layer, MambaLayerState):
                layer.conv.zero_()
                layer.ssm.zero_()
                layer.has_previous_state[0] = False
                layer.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.slot)


class SlotKVLayer(BufferKVLayer):
    """KV rows (k, kv_heads, L, head_dim), views of the pool; row r writes its T new entries at
    `pos[r]`, `pos[r] + 1`, ... (each slot has its own length)."""

    def __init__(self, keys: Tensor, values: Tensor, pos: Tensor, visible: int | None = None):
        super().__init__(keys, values, visible)
        self.pos = pos
        self.rows = torch.arange(keys.shape[0], device=keys.device)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        t = key_states.shape[-2]
        idx = self.pos[:, None] + torch.arange(t, device=self.pos.device)                   # (k, T)
        rows = self.rows[:, None].expand_as(idx)
        self.keys[rows, :, idx] = key_states.transpose(1, 2).to(self.keys.dtype)         # (k, T, kv, D)
        self.values[rows, :, idx] = value_states.transpose(1, 2).to(self.values.dtype)
        return self._visible()

    def get_seq_length(self) -> int:
        return 0
