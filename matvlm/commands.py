"""The CLI's subcommands: typed functions whose signatures and docstrings are the help text.

They parse nothing themselves (matvlm.cli does), call the library, and print results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal


def convert(teacher: Path, out: Path, mamba_ratio: float | None = None,
            placement: Literal["even", "begin", "middle", "end"] = "even", mamba_layers: list[int] | None = None,
            dtype: str | None = None, seed: int = 0, overwrite: bool = False) -> None:
    """Replace a fraction of a teacher's attention layers with Mamba-2 mixers initialised from the
    attention weights (x<-W_V, B<-W_K, C<-W_Q, out_proj<-W_O; paper §3.2) and write a hybrid checkpoint.

    The teacher is a llava-hf or TinyLLaVA directory, or a Phi/Llama/Mistral/Qwen2 causal LM.
    Example: matvlm convert teacher/ hybrid/ --mamba-ratio 0.25

    Args:
        teacher: teacher model directory.
        out: output directory for the hybrid checkpoint (must not exist unless --overwrite).
        mamba_ratio: fraction of decoder layers to replace, in (0, 1] (default 0.25, the paper's best).
        placement: where the Mamba layers go: even = layer floor(i*L/m) (paper default), begin, middle, end.
        mamba_layers: explicit layer indices, e.g. 0,4,8 (overrides --mamba-ratio and --placement).
        dtype: store weights in this dtype (float32, bfloat16, float16); default: the teacher's.
        seed: seed for the randomly initialised parts (z, dt, conv, A).
        overwrite: replace the output directory if it exists.
    """
    from .convert import convert as run
    from .convert.formats import load

    path = run(teacher, out, mamba_ratio=mamba_ratio, placement=placement, mamba_layers=mamba_layers,
               dtype=dtype, seed=seed, overwrite=overwrite)
    cfg = load(path).hybrid_config
    print(f"wrote {path}: {len(cfg.mamba_layers)}/{cfg.n_layer} Mamba-2 layers at {cfg.mamba_layers}")


def info(model: Path) -> None:
    """Print what a model directory holds: its format, decoder layers, Mamba layers and parameters.

    Args:
        model: model directory (teacher or hybrid).
    """
    from .convert.formats import load

    m = load(model)
    cfg = m.hybrid_config
    n_params = sum(p.numel() for p in m.parameters())
    n_mamba = sum(p.numel() for mixer in m.mamba_mixers.values() for p in mixer.parameters())
    print(f"path:          {model}")
    print(f"format:        {m.matvlm_format} ({type(m).__mro__[2].__name__})")
    print(f"decoder:       {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.nheads} heads x {cfg.headdim}")
    print(f"mamba layers:  {cfg.mamba_layers or 'none'}")
    print(f"attn layers:   {cfg.attn_layers}")
    print(f"parameters:    {n_params / 1e6:.2f} M ({n_mamba / 1e6:.2f} M in Mamba-2 mixers)")


def tiny_teacher(out: Path, family: Literal["phi", "llama", "qwen2"] = "phi", layers: int = 8,
                 text_only: bool = False, seed: int = 0, overwrite: bool = False) -> None:
    """Write a tiny random-weight teacher (a transformers LLaVA with a SigLIP-style tower, or a causal LM)
    with a byte-level tokenizer: something to run convert/info on without downloading anything.

    Args:
        out: output directory.
        family: decoder family (llama uses grouped-query attention: 4 query heads, 2 key/value heads).
        layers: number of decoder layers.
        text_only: write a causal LM instead of a VLM.
        seed: weight seed.
        overwrite: replace the output directory if it exists.
    """
    from .errors import MatvlmError
    from .model.io import atomic_dir
    from .toy.tiny import tiny_causal_lm, tiny_llava

    if layers < 1:
        raise MatvlmError(f"--layers must be >= 1, got {layers}")
    kv = 2 if family == "llama" else None
    build = tiny_causal_lm if text_only else tiny_llava
    model, proc = build(family, n_layer=layers, kv_heads=kv, seed=seed)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        proc.save_pretrained(tmp)
    print(f"wrote {out}: tiny {family} {'causal LM' if text_only else 'LLaVA'}, {layers} layers")
