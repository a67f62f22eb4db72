"""What a VLM forward does before the decoder: vision features and their merge into token embeddings.

Split out of transformers' `LlavaModel.forward` so that callers can run the vision tower once and
reuse its features (distillation's teacher and student passes, the engine's prefill), and so that
the connector can be swapped (distillation's frozen teacher connector).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import MatvlmError
from ..ops.attention import sdpa_without_cudnn


def is_vlm(model: nn.Module) -> bool:
    return hasattr(model.config, "vision_config")


def connector(model: nn.Module) -> nn.Module | None:
    return getattr(model.model, "multi_modal_projector", None) if is_vlm(model) else None


@sdpa_without_cudnn()
def vision_features(model: nn.Module, pixel_values: Tensor) -> Tensor:
    """The vision tower's selected hidden states, before the connector. (n_img, 3, H, W) -> (n_img, N, D)."""
    cfg = model.config
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, list) else [cfg.vision_feature_layer]
    hs = [out.hidden_states[i] for i in layers]
    if cfg.vision_feature_select_strategy == "default":
        hs = [h[:, 1:] for h in hs]
    return torch.cat(hs, dim=-1)


def embed(model: nn.Module, input_ids: Tensor, features: Tensor | None) -> Tensor:
    """Token embeddings with the connector's image features written over the image tokens. (B, T, d)."""
    emb = model.get_input_embeddings()(input_ids)
    if features is None:
        return emb
    image_feats = connector(model)(features)                        # (n_img, N, d)
    slots = input_ids == model.config.image_token_id                # (B, T)
    n_slots, n_feats = int(slots.sum()), image_feats.shape[0] * image_feats.shape[1]
    if n_slots != n_feats:
        raise MatvlmError(f"batch has {n_slots} image tokens but its images give {n_feats} features")
    return emb.masked_scatter(slots[..., None], image_feats.reshape(-1, image_feats.shape[-1]).to(emb.dtype))
