"""Images the way the models' processors want them: loading, LLaVA's pad-to-square, the processed size
and how many image tokens one image becomes (used by distillation, the engine, evaluation and the toy).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image

from ..errors import MatvlmError

ASPECTS = ("square", "pad")


def _field(obj, key):
    """`obj[key]` or `obj.key` (image-processor sizes are dicts or transformers' SizeDict)."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def _image_processor(processor):
    return getattr(processor, "image_processor", processor)


def processed_image_size(processor) -> tuple[int, int]:
    """(height, width) of the pixel values the processor's image processor outputs."""
    ip = _image_processor(processor)
    crop, size = getattr(ip, "crop_size", None), getattr(ip, "size", None)
    if getattr(ip, "do_center_crop", False) and _field(crop, "height") and _field(crop, "width"):
        return int(_field(crop, "height")), int(_field(crop, "width"))
    if _field(size, "height") and _field(size, "width"):
        return int(_field(size, "height")), int(_field(size, "width"))
    raise MatvlmError(f"{type(ip).__name__} resizes to {size} without a fixed crop: the number of image "
                      "tokens would depend on each image; expected a fixed height and width")


def image_token_count(processor) -> int:
    """Tokens one image becomes: (H // patch) * (W // patch) + num_additional_image_tokens, minus 1
    for `vision_feature_select_strategy == "default"` (the CLS-dropping strategy), as
    `LlavaProcessor` counts them."""
    patch = getattr(processor, "patch_size", None)
    if not patch:
        raise MatvlmError(f"{type(processor).__name__} has no patch_size: expected a LlavaProcessor "
                          "(patch_size, vision_feature_select_strategy, num_additional_image_tokens)")
    h, w = processed_image_size(processor)
    n = (h // patch) * (w // patch) + (getattr(processor, "num_additional_image_tokens", 0) or 0)
    if getattr(processor, "vision_feature_select_strategy", None) == "default":
        n -= 1
    return n


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad `img` to a square of side max(W, H) filled with `background`, the image centred
    (offset rounded down), per LLaVA llava/mm_utils.py `expand2square`."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def load_image(path: str | Path, processor, aspect: str = "square") -> torch.FloatTensor:
    """An image file as the processor's pixel values, (3, H, W) float32.

    `aspect="pad"` first pads to a square with the processor's mean colour
    (`tuple(int(m * 255) for m in image_mean)`, per LLaVA llava/train/train.py and TinyLLaVA
    image_preprocess.py); `"square"` hands the image straight to the processor, which resizes it.
    """
    if aspect not in ASPECTS:
        raise MatvlmError(f"image aspect must be one of {', '.join(ASPECTS)}, got {aspect!r}")
    ip = _image_processor(processor)
    try:
        with Image.open(path) as f:
            img = f.convert("RGB")
    except OSError as e:
        raise MatvlmError(f"{path}: cannot read the image: {e}") from e
    if aspect == "pad":
        img = expand2square(img, tuple(int(m * 255) for m in ip.image_mean))
    return ip(img, return_tensors="pt")["pixel_values"][0].float()
