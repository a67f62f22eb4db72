"""Hybrid checkpoints: one self-describing directory, safetensors only, written atomically (`model.save`)
and read back here.

Layout (DESIGN.md):
    config.json              the base transformers config (llava-hf or causal LM), unchanged
    mamba_config.json        `HybridConfig` (MaTVLM-compatible fields + matvlm's own)
    model.safetensors        or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    tokenizer / processor / generation files copied from the teacher

Weight names are transformers' `state_dict()` names, except that the mixer of Mamba
layer i is stored under `<decoder>.layers.{i}.mamba.*` (MaTVLM's naming) instead of
`<decoder>.layers.{i}.self_attn.*`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import HybridConfig
from ..errors import MatvlmError
from .hybrid import make_hybrid
from .save import (AUX_FILES, INDEX, MAMBA_CONFIG, SHARD_BYTES, WEIGHTS, _module_name, _rename, atomic_dir,  # noqa: F401
                   atomic_write_text, checkpoint_state_dict, copy_aux_files, mamba_key_renames, save_hybrid,
                   write_safetensors)


# --- reading ----------------------------------------------------------------------------------

def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (refuses pickle-only checkpoints)."""
    if (path / INDEX).is_file():
        try:
            index = json.loads((path / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MatvlmError(f"{path / INDEX} is not a valid safetensors index: {e}") from e
        files = [path / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MatvlmError(f"{path / INDEX} lists weight files that are missing: {', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise MatvlmError(f"{path} has only pickle weights (*.bin/*.pt); matvlm loads safetensors only — "
                          "re-save the model with save_pretrained(safe_serialization=True)")
    raise MatvlmError(f"{path} has no *.safetensors weight files")


def check_readable(files: list[Path]) -> None:
    """Open each file's header (cheap) so a corrupt file is reported by name before any loading."""
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as e:
            raise MatvlmError(f"corrupt or unreadable weight file {f}: {e}") from e


def read_tensors(files: list[Path], dtype: torch.dtype | None = None, rename=None) -> dict[str, torch.Tensor]:
    """All tensors of `files`, floating ones cast to `dtype` if given, keys passed through `rename`."""
    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    t = fh.get_tensor(k)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[rename(k) if rename else k] = t
        except (SafetensorError, OSError) as e:
            raise MatvlmError(f"corrupt or unreadable weight file {f}: {e}") from e
    return out


def _attach_lm_head_bias(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Phi-2's lm_head has a bias that llava-hf's head lacks: give the head one if the checkpoint has it."""
    head = model.get_output_embeddings()
    name = _module_name(model, head)
    if f"{name}.bias" in tensors and head.bias is None:
        head.bias = nn.Parameter(torch.zeros(head.out_features, dtype=head.weight.dtype))


def load_into(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, display=None) -> None:
    """Load `tensors` (transformers names) into `model` strictly; tie the output embedding if the
    config ties it and the checkpoint left it out. `display` maps names to the checkpoint's own
    names in error messages."""
    display = display or (lambda k: k)
    _attach_lm_head_bias(model, tensors)
    expected = set(model.state_dict().keys())
    head_key = f"{_module_name(model, model.get_output_embeddings())}.weight"
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False)) or bool(
        getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(expected - set(tensors) - ({head_key} if tied else set()))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(map(display, missing[:3]))})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(map(display, unexpected[:3]))})")
        raise MatvlmError(f"weights in {where} do not fit the model its config describes: {'; '.join(parts)}")
    for k, t in tensors.items():
        if tuple(model.state_dict()[k].shape) != tuple(t.shape):
            raise MatvlmError(f"weights in {where}: {display(k)} has shape {tuple(t.shape)}, the config expects "
                              f"{tuple(model.state_dict()[k].shape)}")
    model.load_state_dict(tensors, strict=False, assign=True)
    if tied and head_key not in tensors:
        model.tie_weights()


def set_attn_implementation(config, attn_implementation: str | None) -> None:
    if attn_implementation:
        config._attn_implementation = attn_implementation
        if hasattr(config, "text_config"):
            config.text_config._attn_implementation = attn_implementation


def build_empty(config, arch: str | None) -> nn.Module:
    """Instantiate transformers class `arch` from `config` without initialising weights."""
    import transformers
    from transformers.initialization import no_init_weights

    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise MatvlmError(f"config.json names architecture {arch!r}, which transformers "
                          f"{transformers.__version__} does not have")
    with no_init_weights():
        return cls(config)


def load_hybrid_dir(path: Path, dtype: torch.dtype | None = None, attn_implementation: str | None = "sdpa"):
    """Load a directory written by `save_hybrid`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    set_attn_implementation(config, attn_implementation)
    cfg = HybridConfig.load(path / MAMBA_CONFIG)
    model = build_empty(config, (config.architectures or [None])[0])
    make_hybrid(model, cfg)
    forward = mamba_key_renames(model, cfg)
    back = {v: k for k, v in forward.items()}
    tensors = read_tensors(weight_files(path), dtype, rename=lambda k: _rename(k, back))
    load_into(model, tensors, str(path), display=lambda k: _rename(k, forward))
    return model.eval()
