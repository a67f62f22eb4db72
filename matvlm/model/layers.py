"""Where a transformers model keeps its decoder: the text config, the decoder stack and its layers, for
VLMs (`model.model.language_model`) and causal LMs (`model.model`) alike. The lowest module of
`matvlm.model`: hybrid-making, saving and loading all read the structure through it."""

from __future__ import annotations

from torch import nn


def text_config(config):
    """The decoder's config: `config.text_config` for a VLM, the config itself for a causal LM."""
    return config.text_config if hasattr(config, "text_config") else config


def decoder_stack(model: nn.Module) -> nn.Module:
    """The module that owns `.layers` (e.g. `LlamaModel`): the text model of a VLM, or
    `model.model` of a causal LM."""
    inner = getattr(model, "model", None)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no `.model`; not a supported transformers model")
    stack = getattr(inner, "language_model", inner)
    if not isinstance(getattr(stack, "layers", None), nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return stack


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_stack(model).layers
