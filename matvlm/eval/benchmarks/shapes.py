"""Shapes-VQA, the embedded default benchmark (matvlm.toy.shapes), as an evaluation benchmark.

Layout: a directory holding `test.json` (or the JSON file itself) written by `matvlm toy data`
or `shapes.make_splits`, with its `images/` folder beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...toy import shapes
from .base import Sample, existing_image, layout_error, read_json, take

LAYOUT = "DIR/test.json (LLaVA JSON from `matvlm toy data`) with DIR/images/"


@dataclass
class Shapes:
    """Accuracy overall and per question type (exact match after normalisation), and describe token F1."""

    name: str = "shapes"
    label: str = "Shapes"
    headline: str = "accuracy"
    split: str = "test"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        path = Path(data_dir)
        path = path if path.suffix == ".json" else path / f"{self.split}.json"
        records = read_json(self.name, path, LAYOUT)
        if not isinstance(records, list):
            raise layout_error(self.name, path, "expected a JSON list of samples", LAYOUT)
        out = []
        for r in take(records, limit):
            try:
                question = r["conversations"][0]["value"].replace("<image>", "").strip()
                image = existing_image(self.name, path.parent / r["image"], LAYOUT)
                out.append(Sample(id=str(r["id"]), prompt=question, images=[image], max_new_tokens=48,
                                  meta={"record": r}))
            except (KeyError, IndexError, TypeError) as e:
                raise layout_error(self.name, path, f"entry {r.get('id', '?') if isinstance(r, dict) else '?'} "
                                                    f"lacks {e}", LAYOUT) from e
        return out

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        acc = shapes.accuracy(predictions, [s.meta["record"] for s in samples])
        f1 = acc["describe_f1"]                       # None when no "describe" question was asked (--limit)
        return {"accuracy": 100 * acc["overall"], "describe_f1": None if f1 is None else 100 * f1,
                **{f"{q}_accuracy": 100 * v for q, v in acc["per_qtype"].items()}, "missing": acc["missing"]}
