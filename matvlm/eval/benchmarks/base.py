"""What every benchmark reader shares: the Sample record, the Benchmark protocol, lazy images and
the file readers that turn a missing or malformed file into a one-line MatvlmError."""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from PIL import Image

from matvlm.errors import MatvlmError

# LLaVA's answer-format suffixes (docs/Evaluation.md of haotian-liu/LLaVA).
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_LETTER = "Answer with the option's letter from the given choices directly."

T = TypeVar("T")


@dataclass
class Sample:
    """One question of a benchmark.

    Attributes:
        id: question id, unique within the benchmark.
        prompt: the question with the benchmark's answer-format suffix; no chat template and no
            "<image>" placeholder (the engine adds both).
        images: the images in prompt order, as PIL images or zero-argument loaders; [] if none.
        max_new_tokens: generation budget.
        meta: what the scorer needs (answers, category, split, options, ...).
    """

    id: str
    prompt: str
    images: list[Image.Image] | list[Callable[[], Image.Image]]
    max_new_tokens: int
    meta: dict = field(default_factory=dict)


@runtime_checkable
class Benchmark(Protocol):
    """A benchmark: a reader for its published layout and its official scorer.

    ``name`` is the registry key; ``label`` the column name in MaTVLM's tables; ``headline`` the key
    of the metric that column reports.
    """

    name: str

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        """Samples from ``data_dir``; at most ``limit`` (whole groups where scoring needs groups).
        Raises MatvlmError naming the missing or malformed file and the expected layout."""
        ...

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        """Metrics of ``predictions`` ({sample id: model text}); percentages where the benchmark
        reports percentages. A sample without a prediction counts as answered with ""."""
        ...


def load_images(sample: Sample) -> list[Image.Image]:
    """The sample's images as PIL images, calling lazy loaders."""
    return [im if isinstance(im, Image.Image) else im() for im in sample.images]


@dataclass(frozen=True)
class ImageFile:
    """A lazily opened image file; calling it returns an RGB PIL image."""

    path: Path

    def __call__(self) -> Image.Image:
        try:
            with Image.open(self.path) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise MatvlmError(f"cannot read image {self.path}: {e}") from None


@dataclass(frozen=True)
class ImageBytes:
    """A lazily decoded encoded image (PNG/JPEG bytes, or their base64 text as MMBench stores them)."""

    data: bytes | str = field(repr=False)
    source: str = ""  # where it came from, for error messages

    def __call__(self) -> Image.Image:
        raw = base64.b64decode(self.data) if isinstance(self.data, str) else self.data
        try:
            with Image.open(io.BytesIO(raw)) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise MatvlmError(f"cannot decode image {self.source}: {e}") from None


# --------------------------------------------------------------------------------------------
# Errors and file readers
# --------------------------------------------------------------------------------------------


def layout_error(bench: str, path: Path | str, problem: str, layout: str) -> MatvlmError:
    """MatvlmError "<bench>: <path>: <problem>; expected layout: <layout>" on one line."""
    return MatvlmError(" ".join(f"{bench}: {path}: {problem}; expected layout: {layout}".split()))


def require_dir(bench: str, path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise layout_error(bench, path, "no such directory", layout)
    return path


def require_file(bench: str, path: Path, layout: str) -> Path:
    if not path.is_file():
        raise layout_error(bench, path, "no such file", layout)
    return path


def read_json(bench: str, path: Path, layout: str) -> Any:
    require_file(bench, path, layout)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise layout_error(bench, path, f"not valid JSON ({e})", layout) from None


def read_jsonl(bench: str, path: Path, layout: str) -> list[dict]:
    """JSON objects, one per non-empty line."""
    require_file(bench, path, layout)
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):   # not splitlines: U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise layout_error(bench, path, f"line {n} is not JSON ({e})", layout) from None
        if not isinstance(row, dict):
            raise layout_error(bench, path, f"line {n} is not a JSON object", layout)
        rows.append(row)
    return rows


def get_field(bench: str, record: Mapping, key: str, path: Path, where: str, layout: str) -> Any:
    """record[key], or a layout error naming the entry that lacks it."""
    if not isinstance(record, Mapping) or key not in record:
        raise layout_error(bench, path, f"{where} has no field {key!r}", layout)
    return record[key]


def expect_type(bench: str, value: Any, kind: type | tuple, path: Path, what: str, layout: str) -> Any:
    if not isinstance(value, kind):
        wanted = getattr(kind, "__name__", str(kind))
        raise layout_error(bench, path, f"{what} is {type(value).__name__}, not {wanted}", layout)
    return value


def existing_image(bench: str, path: Path, layout: str) -> ImageFile:
    """An ImageFile for a path that must exist (checked now, opened later)."""
    if not path.is_file():
        raise layout_error(bench, path, "image file missing", layout)
    return ImageFile(path)


# --------------------------------------------------------------------------------------------
# Small helpers for readers and scorers
# --------------------------------------------------------------------------------------------


def take(items: Sequence[T], limit: int | None) -> list[T]:
    """The first ``limit`` items (all when limit is None)."""
    if limit is not None and limit < 0:
        raise MatvlmError(f"limit must be >= 0, got {limit}")
    return list(items if limit is None else items[:limit])


def take_groups(groups: Iterable[list[T]], limit: int | None) -> list[T]:
    """Whole groups, in order, while they fit in ``limit`` items; at least one group."""
    out: list[T] = []
    for group in groups:
        if limit is not None and out and len(out) + len(group) > limit:
            break
        out.extend(group)
    return out


def answer_of(predictions: Mapping[str, str], sample: Sample) -> str:
    """The prediction for a sample; "" if there is none."""
    return predictions.get(sample.id, "")


def n_missing(samples: Sequence[Sample], predictions: Mapping[str, str]) -> int:
    return sum(s.id not in predictions for s in samples)


def percent(hits: Iterable[float | bool]) -> float:
    """100 × mean; 0.0 for nothing (the scorers divide by the sample count)."""
    values = [float(h) for h in hits]
    return 100.0 * sum(values) / len(values) if values else 0.0


def is_blank(value: Any) -> bool:
    """Missing cell, as LLaVA's model_vqa_mmbench.is_none reads one: None, NaN, "", "nan", "none"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")
