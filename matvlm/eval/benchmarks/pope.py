"""POPE (Li et al. 2023): object-hallucination yes/no questions on COCO val2014, three splits.

Layout (AoiDragon/POPE ``output/coco``, as LLaVA's docs/Evaluation.md places it):
``<data_dir>/coco_pope_{random,popular,adversarial}.json`` (or under ``<data_dir>/coco/``), JSON
lines ``{"question_id", "image", "text", "label": "yes"|"no"}``, images in ``<data_dir>/val2014/``.

Scoring per LLaVA's ``llava/eval/eval_pope.py``: answers parsed by scoring.pope_yes_no, "yes" is
the positive class; per split accuracy, precision, recall, F1 and yes-ratio (share of "yes"
answers), and their means over the splits. The headline is the mean F1: LLaVA-1.5, TinyLLaVA and
MaTVLM report POPE as F1 averaged over the three splits (UNVERIFIED for MaTVLM's own table).

Answer ids: matvlm's own "<split>/<question_id>"; LLaVA's llava_pope_test.jsonl (haotian-liu/LLaVA,
playground/data/eval/pope) numbers its questions as integers, the split's question_id plus
LLAVA_ID_OFFSET[split] (adversarial 1.., random 10000001.., popular 20000001..); with one split
present, that split's bare question_id (model_vqa_loader.py run on a coco_pope file) also matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import pope_yes_no

from .base import (SHORT_ANSWER, Sample, answer_of, existing_image, get_field, layout_error,
                   n_missing, read_jsonl)

SPLITS = ("random", "popular", "adversarial")
LLAVA_ID_OFFSET = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}  # llava_pope_test.jsonl
LAYOUT = ("<data_dir>/coco_pope_{random,popular,adversarial}.json (JSON lines: question_id, image, "
          "text, label yes|no; also accepted under <data_dir>/coco/) + <data_dir>/val2014/<image>")


@dataclass
class POPE:
    """POPE reader and scorer. Prompt: the question plus LLaVA's short-answer suffix (lmms-eval's
    pope task). ``limit`` is shared evenly between the splits found."""

    max_new_tokens: int = 128

    name: ClassVar[str] = "pope"
    label: ClassVar[str] = "POPE"
    headline: ClassVar[str] = "f1"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        files = {split: _find(data_dir, split) for split in SPLITS}
        files = {split: f for split, f in files.items() if f is not None}
        if not files:
            raise layout_error("pope", data_dir / "coco_pope_random.json", "no POPE split file found", LAYOUT)
        image_dir = next((d for d in (data_dir / "val2014", data_dir / "images", data_dir) if d.is_dir()))
        per_split = None if limit is None else math.ceil(limit / len(files))
        samples = []
        for split, path in files.items():
            rows = read_jsonl("pope", path, LAYOUT)[:per_split]
            samples += [self._sample(split, row, path, image_dir, n) for n, row in enumerate(rows, 1)]
        for s in samples:
            s.meta["answer_keys"] = _llava_ids(s, alone=len(files) == 1)
        return samples if limit is None else samples[:limit]

    def _sample(self, split: str, row: dict, path: Path, image_dir: Path, n: int) -> Sample:
        field = lambda key: get_field("pope", row, key, path, f"line {n}", LAYOUT)  # noqa: E731
        label = str(field("label")).strip().lower()
        if label not in ("yes", "no"):
            raise layout_error("pope", path, f"line {n} has label {label!r}, not yes|no", LAYOUT)
        return Sample(
            id=f"{split}/{field('question_id')}",
            prompt=str(field("text")).strip() + "\n" + SHORT_ANSWER,
            images=[existing_image("pope", image_dir / str(field("image")), LAYOUT)],
            max_new_tokens=self.max_new_tokens,
            meta={"split": split, "label": label},
        )

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        splits = {}
        for split in SPLITS:
            mine = [s for s in samples if s.meta["split"] == split]
            if mine:
                pairs = [(pope_yes_no(answer_of(predictions, s)), s.meta["label"]) for s in mine]
                splits[split] = binary_metrics(pairs)
        keys = ("accuracy", "precision", "recall", "f1", "yes_ratio")
        mean = {k: sum(m[k] for m in splits.values()) / len(splits) if splits else 0.0 for k in keys}
        return {**mean, "splits": splits, "missing_predictions": n_missing(samples, predictions)}


def binary_metrics(pairs: list[tuple[str, str]]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio in percent of (predicted, true) yes/no pairs,
    "yes" positive (eval_pope.py); a ratio with a zero denominator is 0."""
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": 100 * ratio(tp + tn, len(pairs)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * ratio(2 * precision * recall, precision + recall),
        "yes_ratio": 100 * ratio(tp + fp, len(pairs)),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(pairs),
    }


def _llava_ids(sample: Sample, alone: bool) -> tuple[str, ...]:
    """The ids LLaVA's answer files give a sample (see the module doc); () for a non-integer id."""
    qid = sample.id.split("/", 1)[1]
    if not qid.lstrip("-").isdigit():
        return ()
    llava = str(int(qid) + LLAVA_ID_OFFSET[sample.meta["split"]])
    return (llava, str(int(qid))) if alone and llava != str(int(qid)) else (llava,)


def _find(data_dir: Path, split: str) -> Path | None:
    for folder in (data_dir, data_dir / "coco"):
        if (folder / f"coco_pope_{split}.json").is_file():
            return folder / f"coco_pope_{split}.json"
    return None
