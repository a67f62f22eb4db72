"""Tiny random-weight teachers built from transformers configs (tests, the newcomer default).

Nothing here downloads anything: the tokenizer is a byte-level tokenizer built in
memory, the image processor a SigLIP processor configured by hand, and the models
are transformers classes instantiated from configs with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor, PreTrainedTokenizerFast, SiglipVisionConfig)

from ..compat import SiglipImageProcessor

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
FAMILIES = ("phi", "llama", "qwen2")

# The "plain" chat template of matvlm.inputs.templates in Jinja, for `apply_chat_template`:
# "USER: <image>\n<text>\nASSISTANT: <text><|endoftext|>\n" per turn (newlines written as
# expressions because transformers renders templates with trim_blocks).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}{{ '\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}{{ '\\n' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '" + EOS_TOKEN + "\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens, then <|endoftext|>, <pad>, <image>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                   bos_token=None, unk_token=None)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _text_config(family: str, vocab: int, n_layer: int, hidden: int, heads: int, kv_heads: int | None,
                 intermediate: int, pad_id: int, eos_id: int):
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=4096, pad_token_id=pad_id,
                  eos_token_id=eos_id, bos_token_id=eos_id, tie_word_embeddings=False)
    if family == "phi":
        return AutoConfig.for_model("phi", **common, num_key_value_heads=kv_heads or heads,
                                    partial_rotary_factor=0.4, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attention_dropout=0.0)
    if family == "llama":
        return AutoConfig.for_model("llama", **common, num_key_value_heads=kv_heads or heads)
    if family == "qwen2":
        return AutoConfig.for_model("qwen2", **common, num_key_value_heads=kv_heads or heads,
                                    use_sliding_window=False)
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


def _seeded_init(build, seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def tiny_causal_lm(family: str = "llama", n_layer: int = 4, hidden: int = 64, heads: int = 4,
                   kv_heads: int | None = None, seed: int = 0):
    """A random text-only causal LM of `family` and its byte tokenizer."""
    tok = byte_tokenizer()
    cfg = _text_config(family, len(tok), n_layer, hidden, heads, kv_heads, 2 * hidden,
                       tok.pad_token_id, tok.eos_token_id)
    cfg._attn_implementation = "sdpa"
    model = _seeded_init(lambda: AutoModelForCausalLM.from_config(cfg), seed).eval()
    return model, tok


def tiny_llava(family: str = "phi", n_layer: int = 4, hidden: int = 64, heads: int = 4,
               kv_heads: int | None = None, image_size: int = 32, patch: int = 8, vision_hidden: int = 32,
               vision_layers: int = 2, seed: int = 0):
    """A random `LlavaForConditionalGeneration` (SigLIP-style tower, 2-layer GELU projector,
    `family` decoder) and its `LlavaProcessor`.

    Vision features are TinyLLaVA's: hidden state -2 of the tower, first token dropped
    (`vision_feature_select_strategy="default"`), so an image is (image_size/patch)^2 - 1 tokens.
    """
    tok = byte_tokenizer()
    text = _text_config(family, len(tok), n_layer, hidden, heads, kv_heads, 2 * hidden,
                        tok.pad_token_id, tok.eos_token_id)
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size,
                                patch_size=patch)
    n_img = (image_size // patch) ** 2 - 1
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                      projector_hidden_act="gelu", vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=n_img,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = _seeded_init(lambda: LlavaForConditionalGeneration(cfg), seed).eval()
    ip = SiglipImageProcessor(size={"height": image_size, "width": image_size}, do_resize=True,
                               do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE)
    return model, proc


def save_teacher(model, processor, out_dir: str | Path) -> Path:
    """Write a teacher directory the way transformers does (config, safetensors, processor)."""
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
