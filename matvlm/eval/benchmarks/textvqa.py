"""TextVQA (Singh et al. 2019) val: reading text in images; soft accuracy over 10 human answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import textvqa_accuracy

from .base import (SHORT_ANSWER, Sample, answer_of, existing_image, expect_type, get_field,
                   layout_error, n_missing, percent, read_json, require_file, take)
from .results import question_key

LAYOUT = ("<data_dir>/TextVQA_0.5.1_val.json ({'data': [{question_id, question, image_id, answers[10]}]}) "
          "+ <data_dir>/train_images/<image_id>.jpg [+ OCR tokens: 'ocr_tokens' in each entry or "
          "<data_dir>/TextVQA_Rosetta_OCR_v0.2_val.json ({'data': [{image_id, ocr_tokens}]})]")


@dataclass
class TextVQA:
    """TextVQA val reader and scorer.

    Prompt, as in LLaVA's llava_textvqa_val_v051_ocr.jsonl (the layout its eval_textvqa.py parses):
    question, then "Reference OCR token: t1, t2, ..." when OCR tokens are used and the image has
    any, then the short-answer suffix. Scoring: scoring.textvqa_accuracy (m4c_evaluator.py).

    Answer ids: matvlm's own question_id; LLaVA's llava_textvqa_val_v051_ocr.jsonl uses the image_id as
    question_id, and its eval_textvqa.py finds the question by (image_id, lower-cased question of the
    prompt); so does match_answers.

    Attributes:
        ocr: put OCR tokens in the prompt: True (required; error if the data has none), False, or
            None (use them when the data has them). The metrics report which it was.
    """

    ocr: bool | None = None
    max_new_tokens: int = 128

    name: ClassVar[str] = "textvqa"
    label: ClassVar[str] = "VQAT"
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        path = data_dir / "TextVQA_0.5.1_val.json"
        entries = get_field("textvqa", read_json("textvqa", path, LAYOUT), "data", path,
                            "the top level", LAYOUT)
        entries = take(expect_type("textvqa", entries, list, path, "'data'", LAYOUT), limit)
        tokens = self._ocr_tokens(data_dir, entries)
        image_dir = data_dir / "train_images"
        samples = []
        for n, entry in enumerate(entries):
            field = lambda key: get_field("textvqa", entry, key, path, f"data[{n}]", LAYOUT)  # noqa: E731
            answers = [str(a) for a in field("answers")]
            if not answers:
                raise layout_error("textvqa", path, f"data[{n}] has no answers", LAYOUT)
            image_id = str(field("image_id"))
            ocr = tokens.get(image_id) if tokens is not None else None
            lines = [str(field("question")).strip()]
            lines += [f"Reference OCR token: {', '.join(ocr)}"] if ocr else []
            samples.append(Sample(
                id=str(field("question_id")),
                prompt="\n".join(lines + [SHORT_ANSWER]),
                images=[existing_image("textvqa", image_dir / f"{image_id}.jpg", LAYOUT)],
                max_new_tokens=self.max_new_tokens,
                meta={"answers": answers, "ocr": tokens is not None,
                      "answer_keys": (f"{image_id}\t{question_key(str(field('question')))}",)},
            ))
        return samples

    def _ocr_tokens(self, data_dir: Path, entries: list) -> dict[str, list[str]] | None:
        """{image_id: OCR tokens} when OCR is used, else None."""
        if self.ocr is False:
            return None
        if entries and all(isinstance(e, dict) and "ocr_tokens" in e for e in entries):
            return {str(e["image_id"]): [str(t) for t in e["ocr_tokens"]] for e in entries}
        path = data_dir / "TextVQA_Rosetta_OCR_v0.2_val.json"
        if not path.is_file():
            if self.ocr:
                require_file("textvqa", path, LAYOUT)
            return None
        rows = get_field("textvqa", read_json("textvqa", path, LAYOUT), "data", path,
                         "the top level", LAYOUT)
        image_id = lambda n, r: get_field("textvqa", r, "image_id", path, f"data[{n}]", LAYOUT)  # noqa: E731
        return {str(image_id(n, r)): [str(t) for t in r.get("ocr_tokens") or []] for n, r in enumerate(rows)}

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        acc = [textvqa_accuracy(answer_of(predictions, s), s.meta["answers"]) for s in samples]
        return {"accuracy": percent(acc), "n": len(samples),
                "ocr_tokens": bool(samples) and all(s.meta["ocr"] for s in samples),
                "missing_predictions": n_missing(samples, predictions)}
