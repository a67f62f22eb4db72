"""`export`: a matvlm hybrid directory -> a directory that plain transformers (and servers that read
its configs) load with no matvlm installed.

| format  | written as                                                | decoders                 |
|---------|-----------------------------------------------------------|--------------------------|
| `bamba` | `BambaForCausalLM`, or `LlavaForConditionalGeneration`    | Llama, Mistral, Qwen2    |
|         | whose `text_config` is Bamba's (llava-hf VLMs)            |                          |

The mapping and why it is exact: `convert.bamba`. Phi-family decoders (TinyLLaVA's and MaTVLM's
own) match no native hybrid and are refused. The output holds config.json, safetensors weights,
the tokenizer / processor files and `matvlm_export.json` (what was exported from where, the residual
scale); it is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ..errors import MatvlmError
from ..model import io
from ..model.hybrid import decoder_stack, text_config
from . import bamba, formats

FORMATS = ("bamba",)
# transformers' BambaRMSNormGated normalises y * silu(z) per group of intermediate_size / n_groups channels
# from 5.23.0 on (as vLLM's Mixer2RMSNormGated and matvlm's per-head norm do); 5.17-5.22 normalise over all
# channels at once, so an export would load there and compute something else (read in the releases' sources).
BAMBA_GROUPED_NORM = "5.23.0"


def check_transformers_for_bamba(version: str) -> None:
    """One-line error when the installed transformers would load a Bamba export with the wrong gated norm."""
    from packaging.version import Version

    if Version(version) < Version(BAMBA_GROUPED_NORM):
        raise MatvlmError(f"transformers {version} normalises Bamba's gated Mamba output over all channels, matvlm's "
                          f"mixers per head, so the export would load but not compute the same; --format bamba "
                          f"needs transformers >= {BAMBA_GROUPED_NORM} here and wherever the export is loaded "
                          f"(pip install 'transformers>={BAMBA_GROUPED_NORM},<=5.25.0')")
LLAVA_PROJECTOR_OUT = "model.multi_modal_projector.linear_2."     # adds image features to the residual stream


def export(hybrid: str | Path, out: str | Path, format: str = "bamba", overwrite: bool = False) -> Path:
    """Write the hybrid (or teacher) directory `hybrid` in `format` to `out`.

    Args:
        hybrid: a directory matvlm loads (a hybrid, or a teacher: all-attention Bamba).
        out: the output directory (must not exist unless `overwrite`).
        format: "bamba" (the only one so far).
        overwrite: replace `out` if it exists.
    Returns:
        the output directory.
    """
    if format not in FORMATS:
        raise MatvlmError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    import transformers

    check_transformers_for_bamba(transformers.__version__)
    out = Path(out)
    if out.exists() and not overwrite:
        raise MatvlmError(f"output directory {out} already exists (pass --overwrite to replace it)")
    model = formats.load(hybrid)
    tc, hcfg = text_config(model.config), model.hybrid_config
    bamba.check_exportable(tc, hcfg, str(hybrid))
    state = model.state_dict()
    stack = next(n for n, m in model.named_modules() if m is decoder_stack(model)) + "."
    attention_bias = any(k.startswith(stack) and k.endswith(("q_proj.bias", "o_proj.bias")) for k in state)
    layout = bamba.bamba_layout(tc, hcfg, attention_bias, next(model.parameters()).dtype)
    is_vlm = hasattr(model.config, "text_config")
    tensors = bamba.to_bamba_tensors(state, stack, hcfg, layout, (LLAVA_PROJECTOR_OUT,) if is_vlm else ())

    from transformers import BambaConfig

    config = BambaConfig(**layout.config)
    config.architectures = ["BambaForCausalLM"]
    if is_vlm:
        text, config = config, copy.deepcopy(model.config)
        config.text_config = text
        config.tie_word_embeddings = text.tie_word_embeddings
        config.architectures = [formats.LLAVA_ARCH]
    processor = formats.load_processor(hybrid)
    record = {"format": format, "source": str(Path(hybrid).resolve()), "source_format": model.matvlm_format,
              "source_family": tc.model_type, "mamba_layers": hcfg.mamba_layers,
              "decoder_rms_norm_eps": float(tc.rms_norm_eps), "mixer_norm_eps": float(hcfg.norm_eps),
              "residual_scale": layout.residual_scale}
    with io.atomic_dir(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        _drop_default_time_step_limit(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        io.write_safetensors(tensors, tmp)
        processor.save_pretrained(tmp)
        io.copy_aux_files(Path(hybrid), tmp)
        (tmp / bamba.EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _drop_default_time_step_limit(path: Path) -> None:
    """Leave Bamba's `time_step_limit` at its default (0, inf) by leaving it out: JSON has no infinity, and
    transformers 5 writes it as an object older readers do not parse."""
    cfg = json.loads(path.read_text())
    for c in (cfg, cfg.get("text_config") or {}):
        c.pop("time_step_limit", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
