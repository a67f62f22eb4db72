"""Put Mamba-2 mixers into a transformers model, and the behaviour a hybrid model needs.

A hybrid model *is* the transformers model (`LlavaForConditionalGeneration`,
`PhiForCausalLM`, ...) with `layers[i].self_attn` replaced by a `Mamba2Mixer` for each
i in `HybridConfig.mamba_layers`. Its class is swapped for a subclass that adds:

- `hybrid_config`, `new_cache()`;
- `generate(...)` that supplies a `HybridCache` when none is given;
- `save_pretrained(dir)` that writes matvlm's self-describing layout.

A forward pre-hook on the decoder stack passes the 2-D padding mask down to the
mixers as the keyword argument `mamba_padding_mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import HybridConfig
from .cache import CACHE_KWARGS, HybridCache, cache_kwarg
from .layers import decoder_layers, decoder_stack, text_config
from .mixer import Mamba2Mixer
from .save import save_hybrid


@dataclass(frozen=True)
class AttentionNames:
    """Attribute names of an attention module's projections."""

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"


# Decoder families matvlm converts, by the text config's `model_type`.
ATTENTION_NAMES: dict[str, AttentionNames] = {
    "phi": AttentionNames(o="dense"),
    "llama": AttentionNames(),
    "mistral": AttentionNames(),
    "qwen2": AttentionNames(),
}


def attention_names(config) -> AttentionNames:
    mt = text_config(config).model_type
    if mt not in ATTENTION_NAMES:
        raise ValueError(f"unsupported decoder family {mt!r}; supported: {', '.join(sorted(ATTENTION_NAMES))}")
    return ATTENTION_NAMES[mt]


def attention_shape(config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of the decoder's attention."""
    tc = text_config(config)
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return heads, kv, head_dim


def hybrid_config_for(model: nn.Module, mamba_layers: list[int], **overrides) -> HybridConfig:
    """The `HybridConfig` of mixers shaped after `model`'s attention (paper §3.2: nheads = ngroups
    = attention heads, headdim = d_state = head_dim), with q/k/v and o biases kept if present."""
    names = attention_names(model.config)
    heads, _, head_dim = attention_shape(model.config)
    tc = text_config(model.config)
    layers = decoder_layers(model)
    attn = next((l.self_attn for l in layers if not isinstance(l.self_attn, Mamba2Mixer)), None)
    in_bias = attn is not None and getattr(attn, names.q).bias is not None
    out_bias = attn is not None and getattr(attn, names.o).bias is not None
    kw = dict(n_layer=len(layers), mamba_layers=list(mamba_layers), d_model=tc.hidden_size,
              nheads=heads, headdim=head_dim, ngroups=heads, d_state=head_dim,
              in_proj_bias=in_bias, out_proj_bias=out_bias)
    kw.update(overrides)
    return HybridConfig(**kw)


class HybridModelMixin:
    """Methods added to a transformers model once it carries Mamba-2 mixers (or may carry them)."""

    hybrid_config: HybridConfig

    def new_cache(self) -> HybridCache:
        """An empty cache for this model (KV for attention layers, states for Mamba layers)."""
        return HybridCache(self.hybrid_config)

    def generate(self, *args, **kwargs):
        """transformers' `generate`, with a `HybridCache` unless the caller passes a cache (as `cache`
        or `past_key_values`), turns caching off or names a `cache_implementation`. A cache passed under
        the other release's name is handed on under this release's (no deprecation warning)."""
        name = cache_kwarg(self)
        given = next((kwargs.pop(k) for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        for k in CACHE_KWARGS:
            kwargs.pop(k, None)
        if given is None and kwargs.get("use_cache", True) is not False and kwargs.get("cache_implementation") is None:
            given = self.new_cache()
        if given is not None:
            kwargs[name] = given
        return super().generate(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        save_hybrid(self, save_directory, src_dir=kwargs.get("src_dir"))

    @property
    def mamba_mixers(self) -> dict[int, Mamba2Mixer]:
        return {i: l.self_attn for i, l in enumerate(decoder_layers(self)) if isinstance(l.self_attn, Mamba2Mixer)}


_HYBRID_CLASSES: dict[type, type] = {}


def _hybrid_class(cls: type) -> type:
    if issubclass(cls, HybridModelMixin):
        return cls
    if cls not in _HYBRID_CLASSES:
        _HYBRID_CLASSES[cls] = type(f"Hybrid{cls.__name__}", (HybridModelMixin, cls), {"__module__": __name__})
    return _HYBRID_CLASSES[cls]


def _pass_padding_mask(module, args, kwargs):
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and "mamba_padding_mask" not in kwargs:
        kwargs["mamba_padding_mask"] = mask
    return args, kwargs


def make_hybrid(model: nn.Module, cfg: HybridConfig) -> dict[int, nn.Module]:
    """Replace the attention of `cfg.mamba_layers` in `model` by fresh `Mamba2Mixer`s (in place).

    The mixers get the device and dtype of the attention they replace and standard Mamba-2
    init. Returns the replaced attention modules by layer index (for weight init or as the
    frozen teacher path of distillation).
    """
    layers = decoder_layers(model)
    if cfg.n_layer != len(layers):
        raise ValueError(f"hybrid config has n_layer={cfg.n_layer} but the model has {len(layers)} layers")
    replaced = {}
    for i in cfg.mamba_layers:
        old = layers[i].self_attn
        if isinstance(old, Mamba2Mixer):
            continue
        ref = next(old.parameters())
        mixer = Mamba2Mixer(cfg, i)
        mixer.to(device=ref.device, dtype=ref.dtype)
        if ref.device.type != "meta":
            mixer.reset_ssm_parameters()
        layers[i].self_attn = mixer
        replaced[i] = old
    stack = decoder_stack(model)
    if not getattr(stack, "_matvlm_mask_hook", False):
        stack.register_forward_pre_hook(_pass_padding_mask, with_kwargs=True)
        stack._matvlm_mask_hook = True
    model.__class__ = _hybrid_class(type(model))
    model.hybrid_config = cfg
    return replaced
