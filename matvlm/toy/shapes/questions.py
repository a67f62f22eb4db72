"""The Shapes-VQA question grammar: referring expressions (`Ref`), questions and their unique answers
(`answer`), the parser from text (`parse`) and the question proposers (`propose`, `ask`)."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .scene import COLORS, IMAGE_TOKEN, KINDS, QTYPES, SIZES, Scene, Shape

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
