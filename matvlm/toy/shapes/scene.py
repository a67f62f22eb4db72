"""Shapes-VQA scenes: the world's vocabulary (kinds, colours, sizes, question types, answers), `Shape` and
`Scene`, seeded sampling, and the held-out partition of scene space (`scene_split`)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

KINDS = ("circle", "square", "triangle")
COLORS = {  # far apart in RGB and from the background; no antialiasing, so pixels are exactly these
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
SIZES = ("small", "large")
BACKGROUND = (255, 255, 255)
HALF_EXTENT = {"small": 0.22, "large": 0.40}  # half the shape's bounding box, as a fraction of a cell
QTYPES = ("color", "shape", "count", "exist", "position", "describe")
RELATIONS = ("left", "right", "above", "below")
SPLITS = ("train", "val", "test")
HELD_OUT = {"test": (0.0, 0.1), "val": (0.1, 0.2)}  # scene-hash ranges; train is the rest, [0.2, 1)
MAX_GRID = 3
MIN_CELL = 16  # px per cell: keeps large shapes apart and small ones recognisable

ANSWERS: dict[str, tuple[str, ...]] = {  # every short answer per qtype (describe answers are sentences)
    "color": tuple(COLORS),
    "shape": KINDS,
    "count": tuple(str(i) for i in range(MAX_GRID * MAX_GRID + 1)),
    "exist": ("yes", "no"),
    "position": RELATIONS,
}
_TEMPLATE_WORDS = (
    "what color is the shape object how many objects are there a where relative to describe image "
    "at on in top bottom left right center"
).split()
WORDS: tuple[str, ...] = tuple(sorted(set(
    _TEMPLATE_WORDS + list(KINDS) + [k + "s" for k in KINDS] + list(COLORS) + list(SIZES)
    + [a for answers in ANSWERS.values() for a in answers])))
PUNCT = ("?", ".", ",")
VOCAB: tuple[str, ...] = WORDS + PUNCT  # every token of every question and answer, lower-cased
IMAGE_TOKEN = "<image>"



# ----------------------------------------------------------------------------- scenes

@dataclass(frozen=True)
class Shape:
    """One shape in one grid cell (row 0 is the top, col 0 the left)."""

    kind: str
    color: str
    size: str
    row: int
    col: int

    def __post_init__(self) -> None:
        for name, value, allowed in (("kind", self.kind, KINDS), ("color", self.color, tuple(COLORS)),
                                     ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"Shape.{name} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class Scene:
    """Shapes on a `grid` x `grid` board, at most one per cell, kept in reading order."""

    shapes: tuple[Shape, ...]
    grid: int = 3

    def __post_init__(self) -> None:
        if not 2 <= self.grid <= MAX_GRID:
            raise ValueError(f"grid must be 2 or 3 (cell names top/middle/bottom are exact only "
                             f"up to 3x3), got {self.grid}")
        shapes = tuple(sorted(self.shapes, key=lambda s: (s.row, s.col)))
        object.__setattr__(self, "shapes", shapes)
        cells = [(s.row, s.col) for s in shapes]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two shapes share a cell: {cells}")
        if any(not (0 <= r < self.grid and 0 <= c < self.grid) for r, c in cells):
            raise ValueError(f"cells must lie in a {self.grid}x{self.grid} grid, got {cells}")

    def key(self) -> str:
        """Canonical text of the scene: equal scenes have equal keys (image size plays no part)."""
        return f"{self.grid}|" + ";".join(f"{s.row},{s.col},{s.size},{s.color},{s.kind}" for s in self.shapes)

    def to_json(self) -> list[list]:
        """The shapes as [kind, color, size, row, col] lists, in reading order."""
        return [[s.kind, s.color, s.size, s.row, s.col] for s in self.shapes]

    @classmethod
    def from_json(cls, shapes: list[list], grid: int = 3) -> "Scene":
        """Inverse of `to_json`."""
        return cls(tuple(Shape(k, c, z, int(r), int(q)) for k, c, z, r, q in shapes), grid)


def sample_scene(rng: random.Random, grid: int = 3, max_shapes: int = 4) -> Scene:
    """Draw 1..max_shapes shapes with uniform attributes in distinct uniform cells."""
    n = rng.randint(1, max_shapes)
    cells = rng.sample(range(grid * grid), n)
    shapes = tuple(Shape(rng.choice(KINDS), rng.choice(tuple(COLORS)), rng.choice(SIZES), c // grid, c % grid)
                   for c in cells)
    return Scene(shapes, grid)


def scene_from_seed(seed: int | str, grid: int = 3, max_shapes: int = 4) -> Scene:
    """The scene that `sample_scene` draws from a fresh `random.Random(seed)`."""
    return sample_scene(random.Random(seed), grid, max_shapes)


def scene_split(scene: Scene) -> str:
    """The split ("train", "val" or "test") that owns this scene: a fixed hash partition."""
    u = int(hashlib.sha256(scene.key().encode()).hexdigest()[:13], 16) / 16 ** 13  # uniform in [0, 1)
    for split, (lo, hi) in HELD_OUT.items():
        if lo <= u < hi:
            return split
    return "train"
