"""VQAv2 (Goyal et al. 2017): open questions on COCO; soft accuracy over 10 human answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import vqav2_accuracy

from .base import (SHORT_ANSWER, Sample, answer_of, existing_image, expect_type, get_field,
                   layout_error, n_missing, percent, read_json, take)

LAYOUT = ("<data_dir>/v2_OpenEnded_mscoco_<split>_questions.json ({'questions': [{question_id, image_id, "
          "question}]}) + v2_mscoco_<split>_annotations.json ({'annotations': [{question_id, answers: "
          "[{answer}], answer_type}]}) + <split>/COCO_<split>_<image_id:012d>.jpg")


@dataclass
class VQAv2:
    """VQAv2 reader and scorer.

    Scoring: scoring.vqav2_accuracy (LLaVA's submission-time normalisation, then the official
    vqaEval.py), overall and per answer type. Without the annotations file (test-dev, which only
    the EvalAI server scores; MaTVLM's Table 1 reports test-dev) the samples load but do not score.

    Attributes:
        split: "val2014" (scored locally) or "test-dev2015" / "test2015" (images under test2015/).
    """

    split: str = "val2014"
    max_new_tokens: int = 128

    name: ClassVar[str] = "vqav2"
    label: ClassVar[str] = "VQAv2"
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        q_path = data_dir / f"v2_OpenEnded_mscoco_{self.split}_questions.json"
        a_path = data_dir / f"v2_mscoco_{self.split}_annotations.json"
        questions = get_field("vqav2", read_json("vqav2", q_path, LAYOUT), "questions", q_path,
                              "the top level", LAYOUT)
        questions = take(expect_type("vqav2", questions, list, q_path, "'questions'", LAYOUT), limit)
        annotations = self._annotations(a_path) if a_path.is_file() else {}
        image_split = "test2015" if self.split.startswith("test") else self.split
        samples = []
        for n, q in enumerate(questions):
            field = lambda key: get_field("vqav2", q, key, q_path, f"questions[{n}]", LAYOUT)  # noqa: E731
            qid, image_id = field("question_id"), int(field("image_id"))
            ann = annotations.get(str(qid))
            image = data_dir / image_split / f"COCO_{image_split}_{image_id:012d}.jpg"
            samples.append(Sample(
                id=str(qid),
                prompt=str(field("question")).strip() + "\n" + SHORT_ANSWER,
                images=[existing_image("vqav2", image, LAYOUT)],
                max_new_tokens=self.max_new_tokens,
                meta={"answers": ann["answers"] if ann else None,
                      "answer_type": ann["answer_type"] if ann else None},
            ))
        return samples

    def _annotations(self, path: Path) -> dict[str, dict]:
        """{question id: {"answers": [10 strings], "answer_type"}}."""
        rows = get_field("vqav2", read_json("vqav2", path, LAYOUT), "annotations", path,
                         "the top level", LAYOUT)
        out = {}
        for n, row in enumerate(rows):
            answers = get_field("vqav2", row, "answers", path, f"annotations[{n}]", LAYOUT)
            if not answers or not all(isinstance(a, dict) and "answer" in a for a in answers):
                raise layout_error("vqav2", path, f"annotations[{n}].answers is not a list of {{answer}}", LAYOUT)
            out[str(get_field("vqav2", row, "question_id", path, f"annotations[{n}]", LAYOUT))] = {
                "answers": [str(a["answer"]) for a in answers], "answer_type": row.get("answer_type", "other")}
        return out

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        unscorable = [s.id for s in samples if s.meta["answers"] is None]
        if unscorable:
            raise layout_error("vqav2", f"v2_mscoco_{self.split}_annotations.json",
                               f"no annotations for {len(unscorable)} questions (e.g. {unscorable[0]}); "
                               "test-dev is scored by the EvalAI server", LAYOUT)
        acc = {s.id: vqav2_accuracy(answer_of(predictions, s), s.meta["answers"]) for s in samples}
        types = sorted({s.meta["answer_type"] for s in samples})
        return {
            "accuracy": percent(acc.values()),
            "answer_types": {t: percent(acc[s.id] for s in samples if s.meta["answer_type"] == t) for t in types},
            "n": len(samples),
            "missing_predictions": n_missing(samples, predictions),
        }
