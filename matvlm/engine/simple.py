"""Batched greedy answers through transformers' `generate` (hybrid cache, left padding).

The small, dependable path used by evaluation until the engine serves it; it also is the
reference the engine is checked against.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


def build_inputs(processor, questions: list[str], images: list[Image.Image | str | Path | None],
                 template: str, image_aspect: str = "square"):
    """Template the questions, load/pad the images, and run the processor (left padding)."""
    from ..inputs.images import expand2square
    from ..inputs.templates import get_template

    tok = getattr(processor, "tokenizer", processor)
    t = get_template(template, eos_token=tok.eos_token) if template == "plain" else get_template(template)
    texts, pil = [], []
    for q, im in zip(questions, images):
        texts.append(t.prompt([(q, None)], has_image=im is not None))
        if im is not None:
            im = Image.open(im).convert("RGB") if isinstance(im, (str, Path)) else im.convert("RGB")
            if image_aspect == "pad":
                mean = processor.image_processor.image_mean
                im = expand2square(im, tuple(int(m * 255) for m in mean))
            pil.append(im)
    tok.padding_side = "left"
    if pil:
        return processor(text=texts, images=pil, return_tensors="pt", padding=True)
    return tok(texts, return_tensors="pt", padding=True)


@torch.no_grad()
def answer_batch(model, processor, questions: list[str], images: list, template: str, max_new_tokens: int = 64,
                 device: str | torch.device = "cpu", image_aspect: str = "square") -> list[str]:
    """Greedy answers, one per question, stopping at the end-of-turn token."""
    inputs = build_inputs(processor, questions, images, template, image_aspect).to(device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    tok = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
