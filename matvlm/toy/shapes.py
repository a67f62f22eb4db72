"""Shapes-VQA: a procedural, deterministic visual question answering data set.

The project's embedded default: small images (64x64 RGB by default) of 1-4 coloured shapes on a
3x3 grid, closed-vocabulary questions with short answers that the scene decides uniquely, written
in LLaVA / ShareGPT4V JSON so the real training and evaluation code reads it unchanged.

    from matvlm.toy.shapes import make_splits, accuracy
    make_splits("runs/shapes", n_train=20_000, n_test=1_000, seed=0)
    # runs/shapes/{train,test}.json + runs/shapes/images/{train,test}-000000.png ...

A scene is a set of `Shape`s, each in its own grid cell. Questions are built from referring
expressions (`Ref`: optional size, colour, kind) and asked only when their answer is unique:

    qtype     question                                           answers
    color     What color is the [size] {kind}?                   red | green | blue | yellow
    shape     What shape is the [size] {color} object?           circle | square | triangle
    count     How many {kinds | color objects | objects} are there?   0 .. 9
    exist     Is there a {color} {kind}?                         yes | no (balanced)
    position  Where is the {ref A} relative to the {ref B}?      left | right | above | below
    describe  Describe the image.                                one sentence, shapes in reading order

Position is defined on grid cells: A is `left` of B when both are in the same row and A's column
is smaller (`right`: larger); `above` / `below` when both are in the same column and A's row is
smaller / larger (row 0 is the top). Pairs in different rows and columns are never asked.

Held-out splits are a fixed partition of the *scene space*: a scene belongs to `test`, `val` or
`train` by a hash of its canonical description, so no scene of one split can ever occur in another,
whatever seeds or sizes the splits are generated with. Every image is a pure function of
(seed, split, index).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from PIL import Image, ImageDraw

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

_TOKEN_RE = re.compile(r"[a-z0-9]+|[?.,]")


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


# ----------------------------------------------------------------------------- rendering

def shape_box(shape: Shape, grid: int, image_size: int) -> tuple[int, int, int, int]:
    """Integer bounding box (x0, y0, x1, y1), inclusive, of a shape centred in its cell."""
    cell = image_size / grid
    cx, cy = (shape.col + 0.5) * cell, (shape.row + 0.5) * cell
    h = HALF_EXTENT[shape.size] * cell
    return round(cx - h), round(cy - h), round(cx + h), round(cy + h)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as a `size` x `size` RGB image (PIL.ImageDraw, no antialiasing)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = shape_box(s, scene.grid, size)
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:  # triangle, apex up
            draw.polygon(((x0 + x1) / 2, y0, x1, y1, x0, y1), fill=fill)
    return img


# ----------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class Ref:
    """A referring expression: the shapes matching every attribute given (None = any)."""

    kind: str | None = None
    color: str | None = None
    size: str | None = None

    def matches(self, s: Shape) -> bool:
        """Whether shape `s` has every attribute this expression names."""
        return ((self.kind is None or s.kind == self.kind) and (self.color is None or s.color == self.color)
                and (self.size is None or s.size == self.size))

    def text(self, plural: bool = False) -> str:
        """"small red circle", "red object", "circles", "objects"."""
        head = (self.kind or "object") + ("s" if plural else "")
        return " ".join(w for w in (self.size, self.color, head) if w)


@dataclass(frozen=True)
class Question:
    """What a question asks: its type and the referring expressions it names."""

    qtype: str
    a: Ref | None = None
    b: Ref | None = None

    def text(self) -> str:
        """The question in English (closed vocabulary, see `WORDS`)."""
        if self.qtype == "color":
            return f"What color is the {self.a.text()}?"
        if self.qtype == "shape":
            return f"What shape is the {self.a.text()}?"
        if self.qtype == "count":
            return f"How many {self.a.text(plural=True)} are there?"
        if self.qtype == "exist":
            return f"Is there a {self.a.text()}?"
        if self.qtype == "position":
            return f"Where is the {self.a.text()} relative to the {self.b.text()}?"
        if self.qtype == "describe":
            return "Describe the image."
        raise ValueError(f"unknown qtype {self.qtype!r}; expected one of {QTYPES}")


def _find(scene: Scene, ref: Ref) -> list[Shape]:
    return [s for s in scene.shapes if ref.matches(s)]


def _unique(scene: Scene, ref: Ref) -> Shape | None:
    found = _find(scene, ref)
    return found[0] if len(found) == 1 else None


def relation(a: Shape, b: Shape) -> str | None:
    """Where `a` is relative to `b` on the grid, or None unless they share exactly a row or a column."""
    if a.row == b.row and a.col != b.col:
        return "left" if a.col < b.col else "right"
    if a.col == b.col and a.row != b.row:
        return "above" if a.row < b.row else "below"
    return None


def cell_phrase(row: int, col: int, grid: int = 3) -> str:
    """"at the top left", "on the right", "in the center", ... for a cell of a 2x2 or 3x3 grid."""
    v = "top" if row == 0 else "bottom" if row == grid - 1 else "middle"
    h = "left" if col == 0 else "right" if col == grid - 1 else "center"
    if v == "middle":
        return "in the center" if h == "center" else f"on the {h}"
    return f"at the {v}" if h == "center" else f"at the {v} {h}"


def describe(scene: Scene) -> str:
    """One sentence listing every shape in reading order, e.g. "A large red circle at the top left."."""
    parts = [f"a {s.size} {s.color} {s.kind} {cell_phrase(s.row, s.col, scene.grid)}" for s in scene.shapes]
    sentence = ", ".join(parts)
    return sentence[:1].upper() + sentence[1:] + "."


def answer(scene: Scene, question: Question | str) -> str | None:
    """The one right answer to `question` about `scene`, or None when it has no unique answer.

    `question` is a `Question` or its English text (parsed with `parse`).
    """
    q = parse(question) if isinstance(question, str) else question
    if q.qtype == "describe":
        return describe(scene) if scene.shapes else None
    if q.qtype == "count":
        return str(len(_find(scene, q.a)))
    if q.qtype == "exist":
        return "yes" if _find(scene, q.a) else "no"
    a = _unique(scene, q.a)
    if a is None:
        return None
    if q.qtype == "color":
        return a.color
    if q.qtype == "shape":
        return a.kind
    if q.qtype == "position":
        b = _unique(scene, q.b)
        return relation(a, b) if b is not None else None
    raise ValueError(f"unknown qtype {q.qtype!r}; expected one of {QTYPES}")


_PARSERS = [
    ("color", re.compile(r"what color is the (.+)\?")),
    ("shape", re.compile(r"what shape is the (.+)\?")),
    ("count", re.compile(r"how many (.+) are there\?")),
    ("exist", re.compile(r"is there a (.+)\?")),
    ("position", re.compile(r"where is the (.+) relative to the (.+)\?")),
    ("describe", re.compile(r"describe the image\.")),
]


def _parse_ref(text: str, plural: bool = False) -> Ref:
    """Inverse of `Ref.text`."""
    words = text.split()
    head = words.pop().removesuffix("s") if plural else words.pop()
    size = words.pop(0) if words and words[0] in SIZES else None
    color = words.pop(0) if words and words[0] in COLORS else None
    if words or head not in (*KINDS, "object"):
        raise ValueError(f"not a referring expression: {text!r}")
    return Ref(None if head == "object" else head, color, size)


def parse(text: str) -> Question:
    """Inverse of `Question.text`: the question a text asks (raises ValueError on other text)."""
    text = text.removeprefix(IMAGE_TOKEN).strip().lower()
    for qtype, pattern in _PARSERS:
        m = pattern.fullmatch(text)
        if m:
            refs = [_parse_ref(g, plural=qtype == "count") for g in m.groups()]
            return Question(qtype, *refs)
    raise ValueError(f"not a Shapes-VQA question: {text!r}")


def _short_ref(scene: Scene, s: Shape, options: tuple[tuple[str, ...], ...]) -> Ref | None:
    """The first referring expression (by attribute sets `options`) that picks out `s` alone."""
    for attrs in options:
        ref = Ref(**{a: getattr(s, a) for a in attrs})
        if _unique(scene, ref) is s:
            return ref
    return None


def _propose_color(scene: Scene, rng: random.Random) -> Question | None:
    refs = [r for s in scene.shapes if (r := _short_ref(scene, s, (("kind",), ("size", "kind"))))]
    return Question("color", rng.choice(refs)) if refs else None


def _propose_shape(scene: Scene, rng: random.Random) -> Question | None:
    refs = [r for s in scene.shapes if (r := _short_ref(scene, s, (("color",), ("size", "color"))))]
    return Question("shape", rng.choice(refs)) if refs else None


def _propose_count(scene: Scene, rng: random.Random) -> Question:
    if rng.random() < 0.15:
        return Question("count", Ref())
    attr, values = rng.choice((("kind", KINDS), ("color", tuple(COLORS))))
    present = sorted({getattr(s, attr) for s in scene.shapes})
    absent = [v for v in values if v not in present]
    pool = absent if absent and rng.random() < 0.25 else present  # zero answers about a fifth of the time
    return Question("count", Ref(**{attr: rng.choice(pool)}))


def _propose_exist(scene: Scene, rng: random.Random) -> Question:
    if rng.random() < 0.5:
        s = rng.choice(scene.shapes)
        return Question("exist", Ref(s.kind, s.color))
    present = {(s.kind, s.color) for s in scene.shapes}
    absent = [(k, c) for k in KINDS for c in COLORS if (k, c) not in present]  # never empty: 12 > 9 cells
    kind, color = rng.choice(absent)
    return Question("exist", Ref(kind, color))


_POSITION_REFS = (("kind",), ("color", "kind"), ("size", "kind"), ("size", "color", "kind"))


def _propose_position(scene: Scene, rng: random.Random) -> Question | None:
    refs = {s: _short_ref(scene, s, _POSITION_REFS) for s in scene.shapes}
    pairs = [(refs[a], refs[b]) for a in scene.shapes for b in scene.shapes
             if refs[a] and refs[b] and relation(a, b) is not None]
    return Question("position", *rng.choice(pairs)) if pairs else None


_PROPOSERS = {"color": _propose_color, "shape": _propose_shape, "count": _propose_count,
              "exist": _propose_exist, "position": _propose_position,
              "describe": lambda scene, rng: Question("describe")}


def propose(scene: Scene, qtype: str, rng: random.Random) -> Question | None:
    """A random question of type `qtype` with a unique answer about `scene`, or None if there is none."""
    if qtype not in _PROPOSERS:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")
    return _PROPOSERS[qtype](scene, rng)


def ask(scene: Scene, qtype: str, rng: random.Random) -> tuple[str, str] | None:
    """(question text, answer) of a random `qtype` question about `scene`, or None if none is askable."""
    q = propose(scene, qtype, rng)
    return None if q is None else (q.text(), answer(scene, q))


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


# ----------------------------------------------------------------------------- scoring

def tokenize(text: str) -> list[str]:
    """Lower-cased words and the punctuation "?", ".", "," (everything else is dropped)."""
    return _TOKEN_RE.findall(text.lower())


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".?!,;: ")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the word multisets (punctuation ignored)."""
    pred = [t for t in tokenize(prediction) if t not in PUNCT]
    ref = [t for t in tokenize(reference) if t not in PUNCT]
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def accuracy(predictions: Mapping[str, str], samples: Iterable[Mapping | Sample]) -> dict:
    """Exact-match accuracy of `predictions` (sample id -> answer text) on `samples`.

    A missing prediction counts as wrong. Returns {"overall", "n", "missing", "per_qtype":
    {qtype: accuracy}, "n_per_qtype": {qtype: count}, "describe_f1": mean token F1 over describe
    samples (None if there are none)}.
    """
    right, total, f1 = Counter(), Counter(), []
    missing = 0
    for s in samples:
        sid, qtype, ref = (s.id, s.qtype, s.answer) if isinstance(s, Sample) else (s["id"], s["qtype"], s["answer"])
        pred = predictions.get(sid)
        missing += pred is None
        pred = pred or ""
        total[qtype] += 1
        right[qtype] += normalize(pred) == normalize(ref)
        if qtype == "describe":
            f1.append(token_f1(pred, ref))
    n = sum(total.values())
    return {"overall": sum(right.values()) / n if n else 0.0, "n": n, "missing": missing,
            "per_qtype": {q: right[q] / total[q] for q in sorted(total)}, "n_per_qtype": dict(sorted(total.items())),
            "describe_f1": sum(f1) / len(f1) if f1 else None}
