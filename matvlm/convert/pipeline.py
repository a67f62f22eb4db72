"""`convert`: teacher directory -> hybrid checkpoint directory with attention-initialised mixers."""

from __future__ import annotations

from pathlib import Path


from ..errors import MatvlmError
from ..model.hybrid import decoder_layers
from ..model.io import save_hybrid
from . import formats
from .init import hybridize
from .layers import count_for_ratio, select_layers


def convert(teacher: str | Path, out: str | Path, mamba_ratio: float | None = None, placement: str = "even",
            mamba_layers: list[int] | None = None, dtype: str | None = None, seed: int = 0,
            overwrite: bool = False) -> Path:
    """Replace a fraction of `teacher`'s attention layers by Mamba-2 mixers and write the hybrid.

    Args:
        teacher: a llava-hf, TinyLLaVA or causal-LM directory.
        out: output directory (must not exist unless `overwrite`).
        mamba_ratio: fraction of layers to replace, in (0, 1]; default 0.25 (the paper's best).
        placement: even (default), begin, middle or end; "auto" only labels explicit `mamba_layers` chosen by
            measured sensitivity (`distill.placement`).
        mamba_layers: explicit layer indices (overrides ratio and placement).
        dtype: dtype to store, e.g. "bfloat16"; default: the teacher's.
        seed: seed of the random parts of the Mamba-2 init (z, dt, conv, A).
        overwrite: replace `out` if it exists.
    Returns:
        the output directory.
    """
    out = Path(out)
    if mamba_layers is None:
        count_for_ratio(1, 0.25 if mamba_ratio is None else mamba_ratio)    # fail fast on a bad ratio
    if out.exists() and not overwrite:
        raise MatvlmError(f"output directory {out} already exists (pass --overwrite to replace it)")
    model = formats.load(teacher, dtype=dtype)
    if model.hybrid_config.mamba_layers:
        raise MatvlmError(f"{teacher} is already a hybrid (Mamba layers {model.hybrid_config.mamba_layers}); "
                          "convert a transformer teacher")
    processor = formats.load_processor(teacher)
    n_layer = len(decoder_layers(model))
    layers = select_layers(n_layer, mamba_ratio, placement, mamba_layers)
    hybridize(model, layers, seed=seed, source={
        "teacher": str(Path(teacher).resolve()), "teacher_format": model.matvlm_format,
        "placement": "explicit" if mamba_layers is not None and placement != "auto" else placement,
        "mamba_ratio": len(layers) / n_layer, "seed": seed})
    return save_hybrid(model, out, src_dir=teacher, processor=processor, overwrite=overwrite)
