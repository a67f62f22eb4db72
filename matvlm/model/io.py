"""Hybrid checkpoints: one self-describing directory, safetensors only, written atomically.

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
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import HybridConfig
from ..errors import MatvlmError
from .hybrid import decoder_stack, make_hybrid

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
