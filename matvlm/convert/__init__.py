"""Attention -> Mamba-2 conversion: layer choice, weight init, checkpoint readers.

    from matvlm.convert import convert
    convert("teacher_dir", "hybrid_dir", mamba_ratio=0.25)
"""

from .pipeline import convert

__all__ = ["convert"]
