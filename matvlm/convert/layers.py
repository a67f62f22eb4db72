"""Which decoder layers become Mamba-2 layers (paper §3.2, Table 3)."""

from __future__ import annotations

import math

from ..errors import MatvlmError

PLACEMENTS = ("even", "begin", "middle", "end")


def count_for_ratio(n_layer: int, ratio: float) -> int:
    """Number of Mamba layers for `ratio` of `n_layer` (rounded half up, at least 1)."""
    if not 0 < ratio <= 1:
        raise MatvlmError(f"--mamba-ratio must be in (0, 1], got {ratio}")
    return max(1, min(n_layer, math.floor(ratio * n_layer + 0.5)))


def select_layers(n_layer: int, ratio: float | None = None, placement: str = "even",
                  layers: list[int] | None = None) -> list[int]:
    """Indices of the layers to replace.

    `even` (the paper's default) takes layer floor(i*L/m) for i < m, so 25 % of 32 layers is
    0, 4, ..., 28 and 12.5 % is 0, 8, 16, 24. `begin`, `middle` and `end` take m consecutive
    layers at the start, centre or end (the paper's Table 3; `end` failed to distil there).
    An explicit `layers` list wins over ratio and placement.
    """
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layer]
        if bad:
            raise MatvlmError(f"--mamba-layers {bad} out of range: the model has layers 0..{n_layer - 1}")
        if len(set(layers)) != len(layers):
            raise MatvlmError(f"--mamba-layers repeats an index: {layers}")
        if not layers:
            raise MatvlmError("--mamba-layers is empty")
        return sorted(layers)
    if placement not in PLACEMENTS:
        raise MatvlmError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    m = count_for_ratio(n_layer, 0.25 if ratio is None else ratio)
    if placement == "even":
        return [math.floor(i * n_layer / m) for i in range(m)]
    if placement == "begin":
        return list(range(m))
    if placement == "end":
        return list(range(n_layer - m, n_layer))
    start = (n_layer - m) // 2
    return list(range(start, start + m))


def parse_layer_list(text: str) -> list[int]:
    """'0,4,8' -> [0, 4, 8] with a clear error for anything else."""
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError as e:
        raise MatvlmError(f"--mamba-layers must be comma-separated integers like 0,4,8; got {text!r}") from e
