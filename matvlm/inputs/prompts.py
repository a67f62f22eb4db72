"""Turning conversations into prompts, the same way for chat, the web UI, the HTTP server and evaluation.

The model's own chat template (the processor's or tokenizer's Jinja template) wins; a model without
one (TinyLLaVA, released MaTVLM) gets the matvlm template of its decoder family (TinyLLaVA's "phi"
for Phi-2, vicuna for Llama, chatml for Qwen2), or the one asked for by name.
"""

from __future__ import annotations

from .templates import get_template, template_for


def has_chat_template(processor) -> bool:
    tok = getattr(processor, "tokenizer", processor)
    return bool(getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None))


_PROBE = "matvlm-probe-3f9c1a"


def takes_parts(processor) -> bool:
    """Whether the model's chat template reads a message's content as a list of parts (as llava-hf's
    templates do: `{% for c in message['content'] %}`) rather than as a string. A string handed to such a
    template renders as nothing, so the question would be lost: found by rendering a probe message."""
    cached = getattr(processor, "_matvlm_takes_parts", None)
    if cached is not None:
        return cached
    try:
        text = processor.apply_chat_template([{"role": "user", "content": _PROBE}], add_generation_prompt=True,
                                             tokenize=False)
        parts = _PROBE not in text
    except Exception:                     # noqa: BLE001 - a template that fails on a string wants parts
        parts = True
    try:
        processor._matvlm_takes_parts = parts
    except AttributeError:
        pass
    return parts


def render(processor, model_config, messages: list[dict], n_images: int = 0, template: str | None = None) -> str:
    """The prompt for a conversation ending with a user turn.

    Args:
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        n_images: images attached to the first user turn (placeholders are added for them).
        template: a matvlm template name that overrides the model's chat template.
    With the model's own chat template, contents go in the form it reads (`takes_parts`): a list of parts
    (images first, then the text) for templates that iterate parts, else strings (with the processor's
    image token and a newline before the text for each image).
    """
    tok = getattr(processor, "tokenizer", processor)
    if template is None and has_chat_template(processor):
        parts = takes_parts(processor)
        msgs, first_user = [], True
        for m in messages:
            images = n_images if m["role"] == "user" and first_user else 0
            first_user = first_user and m["role"] != "user"
            content = m["content"]
            if parts:
                content = [{"type": "image"}] * images + [{"type": "text", "text": content}]
            elif images:                  # a template that reads strings: the placeholders go in the text
                content = f"{getattr(processor, 'image_token', None) or '<image>'}\n" * images + content
            msgs.append({"role": m["role"], "content": content})
        return processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    t = get_template(template, eos_token=tok.eos_token) if template else template_for(model_config)
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    turns, question = [], None
    for m in messages:
        if m["role"] == "user":
            question = m["content"]
        elif m["role"] == "assistant" and question is not None:
            turns.append((question, m["content"]))
            question = None
    turns.append((question or "", None))
    return t.prompt(turns, has_image=n_images > 0, system=system)


def stop_strings(processor, model_config, template: str | None = None) -> list[str]:
    """End-of-turn strings to stop at beyond the eos token (for templates whose end marker is not eos)."""
    if template is None and has_chat_template(processor):
        return []
    tok = getattr(processor, "tokenizer", processor)
    t = get_template(template, eos_token=tok.eos_token) if template else template_for(model_config)
    return list(t.stop_strings)
