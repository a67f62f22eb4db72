"""matvlm: turn a transformer VLM into a fast hybrid Mamba-2/transformer model (MaTVLM).

    import matvlm
    model = matvlm.load("hybrid_dir")            # a transformers model with Mamba-2 mixers
    processor = matvlm.load_processor("hybrid_dir")
    from matvlm.convert import convert
    convert("teacher_dir", "out_dir", mamba_ratio=0.25)
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("matvlm.convert.formats", "load"),
    "load_processor": ("matvlm.convert.formats", "load_processor"),
    "detect_format": ("matvlm.convert.formats", "detect_format"),
    "HybridConfig": ("matvlm.config", "HybridConfig"),
    "HybridCache": ("matvlm.model.cache", "HybridCache"),
    "Mamba2Mixer": ("matvlm.model.mixer", "Mamba2Mixer"),
    "MatvlmError": ("matvlm.errors", "MatvlmError"),
}


def __getattr__(name):  # lazy: `import matvlm` stays fast (the CLI's --help does not load torch)
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'matvlm' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
