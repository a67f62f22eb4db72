"""GQA (Hudson & Manning 2019) test-dev balanced: compositional questions, exact-match accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import normalize_gqa

from .base import (SHORT_ANSWER, Sample, answer_of, existing_image, expect_type, get_field, n_missing,
                   percent, read_json, take)

LAYOUT = ("<data_dir>/testdev_balanced_questions.json ({question_id: {question, imageId, answer}}) "
          "+ <data_dir>/images/<imageId>.jpg")


@dataclass
class GQA:
    """GQA test-dev balanced reader and scorer: accuracy = % of predictions equal to the answer
    after scoring.normalize_gqa (LLaVA's convert_gqa_for_eval.py, then GQA's eval.py exact match)."""

    max_new_tokens: int = 128

    name: ClassVar[str] = "gqa"
    label: ClassVar[str] = "GQA"
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        path = data_dir / "testdev_balanced_questions.json"
        questions = expect_type("gqa", read_json("gqa", path, LAYOUT), dict, path, "the top level", LAYOUT)
        samples = []
        for qid, q in take(list(questions.items()), limit):
            field = lambda key: get_field("gqa", q, key, path, f"question {qid}", LAYOUT)  # noqa: E731
            samples.append(Sample(
                id=str(qid),
                prompt=str(field("question")).strip() + "\n" + SHORT_ANSWER,
                images=[existing_image("gqa", data_dir / "images" / f"{field('imageId')}.jpg", LAYOUT)],
                max_new_tokens=self.max_new_tokens,
                meta={"answer": str(field("answer"))},
            ))
        return samples

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        hits = [normalize_gqa(answer_of(predictions, s)) == s.meta["answer"] for s in samples]
        return {"accuracy": percent(hits), "n": len(samples),
                "missing_predictions": n_missing(samples, predictions)}
