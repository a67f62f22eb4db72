"""Readers for the checkpoint layouts matvlm opens, all into transformers models.

| format            | recognised by                                        | read as                    |
|-------------------|------------------------------------------------------|----------------------------|
| `matvlm`          | config.json + mamba_config.json written by matvlm    | hybrid (its Mamba layers)  |
| `llava-hf`        | config.json `model_type: llava`                      | teacher (0 Mamba layers)   |
| `causal-lm`       | config.json of a Phi / Llama / Mistral / Qwen2 LM    | teacher (0 Mamba layers)   |
| `tinyllava`       | config.json `model_type: tinyllava`                  | teacher, keys mapped       |
| `matvlm-upstream` | `tinyllava` + MaTVLM's mamba_config.json             | hybrid, keys mapped        |
| `bamba`           | `model_type: bamba`, or llava with a Bamba text model | hybrid (`convert.bamba`)   |

TinyLLaVA key names (TinyLLaVA_Factory's `TinyLlavaForConditionalGeneration`; MaTVLM's
release uses the same with `layers.{i}.mamba.*` for its Mamba layers):
`language_model.model.*`, `language_model.lm_head.*`, `vision_tower._vision_tower.vision_model.*`,
`connector._connector.{0,2}.*` (mlp2x_gelu: Linear, GELU, Linear).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..config import HybridConfig
from ..errors import MatvlmError, NotAModelError
from ..model import io
from ..model.hybrid import ATTENTION_NAMES, decoder_stack, hybrid_config_for, make_hybrid

LLAVA_ARCH = "LlavaForConditionalGeneration"
IMAGE_TOKEN = "<image>"


def read_config(path: Path) -> dict:
    if not path.exists():
        raise NotAModelError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise NotAModelError(f"{path} is not a directory (expected a model directory with config.json)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise NotAModelError(f"{path} has no config.json: not a model directory (expected a transformers, "
                             "TinyLLaVA or matvlm checkpoint)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise NotAModelError(f"{cfg} is not valid JSON: {e}") from e


def detect_format(path: str | Path) -> str:
    """One of 'matvlm', 'llava-hf', 'causal-lm', 'tinyllava', 'matvlm-upstream', 'bamba' (see module doc)."""
    path = Path(path)
    cfg = read_config(path)
    mt = cfg.get("model_type")
    has_mamba = (path / io.MAMBA_CONFIG).is_file()
    if mt == "tinyllava":
        return "matvlm-upstream" if has_mamba else "tinyllava"
    if mt == "bamba" or (mt == "llava" and (cfg.get("text_config") or {}).get("model_type") == "bamba"):
        return "bamba"
    if mt == "llava" or mt in ATTENTION_NAMES:
        if mt == "llava":
            text_mt = (cfg.get("text_config") or {}).get("model_type", "llama")
            if text_mt not in ATTENTION_NAMES:
                raise MatvlmError(f"{path}: unsupported decoder family {text_mt!r} inside the LLaVA model; "
                                  f"supported: {', '.join(sorted(ATTENTION_NAMES))}")
        if has_mamba:
            return "matvlm"
        return "llava-hf" if mt == "llava" else "causal-lm"
    raise MatvlmError(f"{path}: unsupported architecture (model_type {mt!r}); expected a LLaVA (llava-hf or "
                      f"TinyLLaVA) VLM or a causal LM of the families {', '.join(sorted(ATTENTION_NAMES))}")


def load_transformers_dir(path: Path, fmt: str, dtype: torch.dtype | None, attn_implementation: str | None):
    """A llava-hf or causal-LM teacher directory through transformers' own loader (local files only),
    as a hybrid model with no Mamba layers."""
    io.check_readable(io.weight_files(path))     # refuse pickle-only, empty or corrupt directories up front
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    io.set_attn_implementation(config, attn_implementation)
    cls = LlavaForConditionalGeneration if fmt == "llava-hf" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, config=config, dtype=dtype or "auto", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise MatvlmError(f"transformers could not load {path}: {str(e).splitlines()[0]}") from e
    make_hybrid(model, hybrid_config_for(model, []))
    return model


# --- TinyLLaVA / released MaTVLM --------------------------------------------------------------

TINYLLAVA_SELECT = {"patch": "default", "cls_patch": "full"}


def tinyllava_processor(path: Path, cfg: dict):
    """A `LlavaProcessor` for a TinyLLaVA directory: its tokenizer with an `<image>` token added
    (TinyLLaVA itself marks images with id -200, which no vocabulary holds) and a SigLIP image
    processor (the directory's preprocessor_config.json if present)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MatvlmError(f"{path}: cannot read the TinyLLaVA tokenizer (tokenizer.json or vocab.json + "
                          f"merges.txt expected): {str(e).splitlines()[0]}") from e
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    vision = cfg.get("vision_config") or {}
    if (path / "preprocessor_config.json").is_file():
        image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        from ..compat import SiglipImageProcessor
        size = int(vision.get("image_size", 384))
        image_processor = SiglipImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                               image_std=[0.5] * 3)
    strategy = TINYLLAVA_SELECT.get(cfg.get("vision_feature_select_strategy", "patch"), "default")
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=int(vision.get("patch_size", 14)), vision_feature_select_strategy=strategy,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=0)


def tinyllava_to_llava_config(cfg: dict, path: Path, image_token_id: int):
    """A `LlavaConfig` equivalent to a TinyLLaVA config.json (embedded text/vision configs)."""
    from transformers import AutoConfig, LlavaConfig

    for k in ("text_config", "vision_config"):
        if not isinstance(cfg.get(k), dict) or "model_type" not in cfg[k]:
            raise MatvlmError(f"{path}/config.json: TinyLLaVA config has no embedded {k} with a model_type "
                              "(matvlm reads TinyLLaVA checkpoints offline from these)")
    if cfg.get("connector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise MatvlmError(f"{path}: TinyLLaVA connector {cfg['connector_type']!r} is not supported "
                          "(only mlp2x_gelu maps onto llava-hf's projector)")
    strategy = cfg.get("vision_feature_select_strategy", "patch")
    if strategy not in TINYLLAVA_SELECT:
        raise MatvlmError(f"{path}: vision_feature_select_strategy {strategy!r}; expected patch or cls_patch")
    tc = dict(cfg["text_config"])
    if not 0 <= image_token_id < tc.get("vocab_size", 0):
        raise MatvlmError(f"{path}: the <image> token gets id {image_token_id}, outside the embedding's "
                          f"{tc.get('vocab_size')} rows")
    vc = dict(cfg["vision_config"])
    text = AutoConfig.for_model(tc.pop("model_type"), **tc)
    vision = AutoConfig.for_model(vc.pop("model_type"), **vc)
    n_patch = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaConfig(text_config=text, vision_config=vision, projector_hidden_act="gelu",
                        vision_feature_layer=cfg.get("vision_feature_layer", -2),
                        vision_feature_select_strategy=TINYLLAVA_SELECT[strategy],
                        image_seq_length=n_patch - (strategy == "patch"),
                        image_token_id=image_token_id,
                        tie_word_embeddings=bool(tc.get("tie_word_embeddings", False)))
    llava.image_aspect_ratio = cfg.get("image_aspect_ratio", "square")
    return llava


def tinyllava_key_map(model: nn.Module):
    """A function from TinyLLaVA key names to `model`'s state-dict names."""
    names = {id(m): n for n, m in model.named_modules()}
    stack = names[id(decoder_stack(model))]
    vision = names[id(model.model.vision_tower)]
    proj = names[id(model.model.multi_modal_projector)]
    head = names[id(model.get_output_embeddings())]
    own = set(model.state_dict())
    rules = [
        (r"^language_model\.model\.", f"{stack}."),
        (r"^language_model\.lm_head\.", f"{head}."),
        (r"^connector\._connector\.0\.", f"{proj}.linear_1."),
        (r"^connector\._connector\.2\.", f"{proj}.linear_2."),
    ]

    def rename(key: str) -> str:
        for pat, rep in rules:
            if re.match(pat, key):
                return re.sub(pat, rep, key)
        m = re.match(r"^vision_tower\._vision_tower\.(vision_model\.)?(.*)$", key)
        if m:
            for cand in (f"{vision}.vision_model.{m.group(2)}", f"{vision}.{m.group(2)}"):
                if cand in own:
                    return cand
            return f"{vision}.{m.group(2)}"
        raise MatvlmError(f"unknown TinyLLaVA weight name {key!r} (expected language_model.*, "
                          "vision_tower._vision_tower.*, connector._connector.{0,2}.*)")

    return rename


def load_tinyllava_dir(path: Path, fmt: str, dtype: torch.dtype | None, attn_implementation: str | None):
    cfg = read_config(path)
    processor = tinyllava_processor(path, cfg)
    config = tinyllava_to_llava_config(cfg, path, processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    io.set_attn_implementation(config, attn_implementation)
    files = io.weight_files(path)
    model = io.build_empty(config, LLAVA_ARCH)
    hcfg = (HybridConfig.load(path / io.MAMBA_CONFIG) if fmt == "matvlm-upstream"
            else hybrid_config_for(model, []))
    if fmt == "matvlm-upstream":
        # MaTVLM's release has no in_proj/out_proj bias (its `is_bias` defaults to False).
        up = json.loads((path / io.MAMBA_CONFIG).read_text())
        hcfg.in_proj_bias = hcfg.out_proj_bias = bool(up.get("is_bias", False))
    make_hybrid(model, hcfg)
    tiny_rename = tinyllava_key_map(model)
    back = {v: k for k, v in io.mamba_key_renames(model, hcfg).items()}
    tensors = io.read_tensors(files, dtype, rename=lambda k: io._rename(tiny_rename(k), back))
    io.load_into(model, tensors, str(path))
    return model.eval()


# --- entry point ------------------------------------------------------------------------------

def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         attn_implementation: str | None = "sdpa"):
    """Open any supported model directory as a hybrid transformers model (see module doc).

    Args:
        path: model directory.
        dtype: e.g. torch.bfloat16 or "bfloat16"; None keeps the checkpoint's dtype.
        device: where to put the model; None leaves it on the CPU.
        attn_implementation: transformers attention backend for the attention layers.
    """
    path = Path(path)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise MatvlmError(f"unknown dtype {dtype!r}; expected e.g. float32, bfloat16, float16")
        dtype = getattr(torch, dtype)
    fmt = detect_format(path)
    if fmt == "matvlm":
        model = io.load_hybrid_dir(path, dtype, attn_implementation)
    elif fmt in ("tinyllava", "matvlm-upstream"):
        model = load_tinyllava_dir(path, fmt, dtype, attn_implementation)
    elif fmt == "bamba":
        from .bamba import load_bamba_dir

        model = load_bamba_dir(path, dtype, attn_implementation)
    else:
        model = load_transformers_dir(path, fmt, dtype, attn_implementation)
    model.matvlm_source_dir = path
    model.matvlm_format = fmt
    if device is not None:
        model.to(device)
    return model.eval()


@contextmanager
def _quiet_torchvision_fallback():
    """transformers warns on every load that, without torchvision, image processors use their PIL
    backend; that is expected here (matvlm does not depend on torchvision), so drop that line."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record):
            return "requires torchvision" not in record.getMessage()

    loggers = [logging.getLogger(n) for n in ("transformers", "transformers.image_processing_utils",
                                              "transformers.models.auto.image_processing_auto")]
    f = _Drop()
    for lg in loggers:
        lg.addFilter(f)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(f)


def load_processor(path: str | Path):
    """The tokenizer (text models) or `LlavaProcessor` (VLMs) of a model directory."""
    from transformers import AutoProcessor, AutoTokenizer

    path = Path(path)
    fmt = detect_format(path)
    if fmt in ("tinyllava", "matvlm-upstream"):
        return tinyllava_processor(path, read_config(path))
    is_vlm = read_config(path).get("model_type") == "llava"
    try:
        if is_vlm:
            with _quiet_torchvision_fallback():
                return AutoProcessor.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MatvlmError(f"{path}: cannot read its {'processor' if is_vlm else 'tokenizer'} files: "
                          f"{str(e).splitlines()[0]}") from e
