"""Writing hybrid checkpoints: one self-describing directory, safetensors only, written atomically (the
layout is in `model.io`'s docstring). Key names: the mixer of Mamba layer i is stored under
`<decoder>.layers.{i}.mamba.*` (MaTVLM's naming) instead of `<decoder>.layers.{i}.self_attn.*`.
Also the atomic file helpers (`atomic_dir`, `atomic_write_text`) every writer in matvlm uses.

Below `model.hybrid` (whose `save_pretrained` calls `save_hybrid`) and `model.io` (which loads): it
reads the model's structure through `model.layers` only.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import HybridConfig
from ..errors import MatvlmError
from .layers import decoder_stack

MAMBA_CONFIG = "mamba_config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
             "tokenizer.model", "added_tokens.json", "preprocessor_config.json", "processor_config.json",
             "chat_template.json", "chat_template.jinja", "generation_config.json")
SHARD_BYTES = 4 * 1024**3


# --- key names --------------------------------------------------------------------------------

def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def mamba_key_renames(model: nn.Module, cfg: HybridConfig) -> dict[str, str]:
    """Prefix renames from transformers' names to the checkpoint's for the Mamba layers."""
    stack = _module_name(model, decoder_stack(model))
    pre = f"{stack}.layers" if stack else "layers"
    return {f"{pre}.{i}.self_attn.": f"{pre}.{i}.mamba." for i in cfg.mamba_layers}


def _rename(key: str, renames: dict[str, str]) -> str:
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save, under checkpoint names; tied duplicates are written once."""
    renames = mamba_key_renames(model, model.hybrid_config)
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if ptr is not None and ptr in seen:
            continue                                                   # tied weight (e.g. lm_head)
        seen.add(ptr)
        out[_rename(key, renames)] = t.detach().contiguous().cpu()
    return out


# --- writing ----------------------------------------------------------------------------------

@contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out_dir`, on error it is removed."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MatvlmError(f"output directory {out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a hidden temporary sibling and a rename, so that no reader (or
    interrupted run) ever finds half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = SHARD_BYTES) -> None:
    """One file, or shards plus a transformers-style index when larger than `max_shard_bytes`."""
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += n
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / WEIGHTS), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def copy_aux_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in AUX_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def save_hybrid(model: nn.Module, out_dir: str | Path, src_dir: str | Path | None = None, processor=None,
                overwrite: bool = True) -> Path:
    """Write `model` (a hybrid from `make_hybrid` / `load`) as a hybrid checkpoint directory.

    Tokenizer and processor files come from `processor` (saved with `save_pretrained`) or are
    copied from `src_dir` (default: the directory the model was loaded from).
    """
    src = Path(src_dir) if src_dir is not None else getattr(model, "matvlm_source_dir", None)
    base = type(model).__mro__[2] if type(model).__name__.startswith("Hybrid") else type(model)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.config.architectures = [base.__name__]
        model.config.save_pretrained(tmp)
        model.hybrid_config.save(tmp / MAMBA_CONFIG)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_safetensors(checkpoint_state_dict(model), tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        copy_aux_files(Path(src) if src else None, tmp)
    return Path(out_dir)
