"""Shapes-VQA data sets: sampling images and questions per split (`generate`) and writing them as LLaVA
JSON with PNG images (`write_dataset`, `make_splits`); reading them back (`load_samples`)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .draw import render
from .questions import Question, answer, propose
from .scene import (
    IMAGE_TOKEN,
    MAX_GRID,
    MIN_CELL,
    QTYPES,
    SPLITS,
    Scene,
    sample_scene,
    scene_split,
)

# ----------------------------------------------------------------------------- data sets

@dataclass
class ShapesConfig:
    """How a Shapes-VQA split is drawn.

    Attributes:
        image_size: side of the square RGB images, in pixels.
        grid: cells per side (2 or 3).
        max_shapes: shapes per scene are uniform in 1..max_shapes.
        questions_per_image: distinct question types asked about each image (<= len(qtypes)).
        qtypes: the question types to draw from, uniformly.
    """

    image_size: int = 64
    grid: int = 3
    max_shapes: int = 4
    questions_per_image: int = 1
    qtypes: tuple[str, ...] = QTYPES

    def __post_init__(self) -> None:
        self.qtypes = tuple(self.qtypes)
        if not 2 <= self.grid <= MAX_GRID:
            raise ValueError(f"grid must be 2 or 3, got {self.grid}")
        if self.image_size // self.grid < MIN_CELL:
            raise ValueError(f"image_size {self.image_size} leaves cells under {MIN_CELL} px for a {self.grid}x"
                             f"{self.grid} grid (shapes would touch or be unrecognisable); expected >= "
                             f"{MIN_CELL * self.grid}")
        if not 1 <= self.max_shapes <= self.grid ** 2:
            raise ValueError(f"max_shapes must be in 1..{self.grid ** 2} (one shape per cell), got {self.max_shapes}")
        unknown = [q for q in self.qtypes if q not in QTYPES]
        if unknown or not self.qtypes or len(set(self.qtypes)) != len(self.qtypes):
            raise ValueError(f"qtypes must be distinct names from {QTYPES}, got {self.qtypes}")
        if "position" in self.qtypes and self.max_shapes < 2:
            raise ValueError("position questions need max_shapes >= 2")
        if not 1 <= self.questions_per_image <= len(self.qtypes):
            raise ValueError(f"questions_per_image must be in 1..{len(self.qtypes)} (each image gets distinct "
                             f"question types), got {self.questions_per_image}")


@dataclass(frozen=True)
class Sample:
    """One question about one image, with its answer."""

    id: str
    image: str  # path relative to the data set directory
    question: str
    answer: str
    qtype: str
    scene: Scene = field(repr=False)

    def to_llava(self) -> dict:
        """The LLaVA / ShareGPT4V record (plus `qtype`, `answer`, `scene`, `grid`)."""
        return {"id": self.id, "image": self.image,
                "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
                                  {"from": "gpt", "value": self.answer}],
                "qtype": self.qtype, "answer": self.answer,
                "scene": self.scene.to_json(), "grid": self.scene.grid}


_MAX_TRIES = 100_000


def _draw_item(rng: random.Random, split: str, config: ShapesConfig) -> tuple[Scene, list[Question]]:
    """A scene owned by `split` and `questions_per_image` answerable questions of distinct types."""
    qtypes = rng.sample(config.qtypes, config.questions_per_image)
    for _ in range(_MAX_TRIES):
        scene = sample_scene(rng, config.grid, config.max_shapes)
        if scene_split(scene) != split:
            continue
        questions = [propose(scene, q, rng) for q in qtypes]
        if all(questions):
            return scene, questions
    raise RuntimeError(f"no {split} scene in {_MAX_TRIES} draws can be asked {qtypes}; check the config")


def generate(n: int, seed: int, split: str = "train",
             config: ShapesConfig | None = None) -> Iterator[tuple[str, Scene, list[Sample]]]:
    """Yield (image id, scene, samples) for `n` images; image i depends only on (seed, split, i)."""
    config = config or ShapesConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    width = max(6, len(str(n - 1)))
    for i in range(n):
        image_id = f"{split}-{i:0{width}d}"
        scene, questions = _draw_item(random.Random(f"matvlm-shapes/{seed}/{split}/{i}"), split, config)
        samples = [Sample(image_id if len(questions) == 1 else f"{image_id}-{j}", f"images/{image_id}.png",
                          q.text(), answer(scene, q), q.qtype, scene) for j, q in enumerate(questions)]
        yield image_id, scene, samples


def write_dataset(out_dir: str | Path, n: int, seed: int, split: str = "train", image_size: int = 64,
                  grid: int = 3, max_shapes: int = 4, questions_per_image: int = 1,
                  qtypes: tuple[str, ...] = QTYPES) -> Path:
    """Write `n` images to out_dir/images/<split>-<i>.png and their questions to out_dir/<split>.json.

    The JSON is a LLaVA list of n * questions_per_image records. Returns the JSON's path.
    """
    config = ShapesConfig(image_size, grid, max_shapes, questions_per_image, qtypes)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, scene, samples in generate(n, seed, split, config):
        render(scene, config.image_size).save(out_dir / "images" / f"{image_id}.png", format="PNG", compress_level=1)
        records.extend(s.to_llava() for s in samples)
    path = out_dir / f"{split}.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def make_splits(out_dir: str | Path, n_train: int, n_test: int, seed: int, n_val: int = 0, **kwargs) -> dict[str, Path]:
    """Write train.json and test.json (and val.json if n_val) into out_dir; kwargs go to `write_dataset`.

    The splits share no image and no scene (see `scene_split`). Returns split -> JSON path.
    """
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    return {split: write_dataset(out_dir, n, seed, split, **kwargs) for split, n in sizes.items()
            if n or split != "val"}


def load_samples(path: str | Path) -> list[dict]:
    """The records of a Shapes-VQA JSON file."""
    return json.loads(Path(path).read_text())
