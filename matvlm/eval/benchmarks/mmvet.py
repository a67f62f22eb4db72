"""MM-Vet (Yu et al. 2023): 218 open-ended questions over six capabilities, graded by GPT-4.

Layout (yuweihao/MM-Vet release ``mm-vet.zip``): ``<data_dir>/mm-vet.json`` ({"v1_0": {imagename,
question, answer, capability: [...]}, ...}) + ``<data_dir>/images/<imagename>``.

MM-Vet's official score (mm-vet_evaluator.py) is the mean of a GPT-4 grader's 0..1 marks (× 100),
overall, per capability (rec, ocr, know, gen, spat, math: the mean over the questions that need it)
and per capability integration (each question's exact set of capabilities). Marks here come from a
pluggable ``judge``: an LLM behind an OpenAI-compatible endpoint (matvlm.eval.judge.LLMJudge, which
says which prompt it used and whether its numbers are comparable to published ones), or, offline,
containment of the reference answer honouring MM-Vet's "<AND>" / "<OR>" markers (the default,
``comparable_to_published: False``). The prompt is the bare question (LLaVA's mmvet.sh
uses model_vqa.py without a suffix, max_new_tokens 1024).

Answer ids: matvlm's own "v1_<n>" (mm-vet.json's keys, also those of LLaVA's convert_mmvet_for_eval.py
output); LLaVA's llava-mm-vet.jsonl numbers the questions as integers <n>.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .base import Sample, answer_of, existing_image, expect_type, get_field, n_missing, percent, read_json, take

LAYOUT = "<data_dir>/mm-vet.json ({id: {imagename, question, answer, capability}}) + <data_dir>/images/<imagename>"

Judge = Callable[[str, str, str], float]
"""(question, reference answer, prediction) -> mark in [0, 1]."""


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?%?", text.lower()))


def containment_judge(question: str, answer: str, prediction: str) -> float:
    """1.0 when the prediction contains the reference answer as whole words (case and punctuation
    ignored), else 0.0. "a <OR> b": either; "a <AND> b": both (MM-Vet's answer markers)."""
    said = f" {_words(prediction)} "

    def present(part: str) -> bool:
        words = _words(part)
        return bool(words) and f" {words} " in said

    return float(any(all(present(p) for p in alt.split("<AND>")) for alt in answer.split("<OR>")))

def _llava_id(key: str) -> tuple[str, ...]:
    """"v1_12" -> ("12",): the integer question_id of LLaVA's llava-mm-vet.jsonl."""
    tail = key.rsplit("_", 1)[-1]
    return (str(int(tail)),) if key.startswith("v1_") and tail.isdigit() else ()


@dataclass
class MMVet:
    """MM-Vet reader and (non-official) scorer.

    Attributes:
        judge: grader of one answer, (question, reference, prediction) -> [0, 1]; default
            containment_judge. One with a ``describe()`` (LLMJudge) says what the results record.
    """

    judge: Judge | None = None
    max_new_tokens: int = 1024  # LLaVA's model_vqa.py

    name: ClassVar[str] = "mmvet"
    label: ClassVar[str] = "MM-Vet"
    headline: ClassVar[str] = "score"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        path = data_dir / "mm-vet.json"
        entries = expect_type("mmvet", read_json("mmvet", path, LAYOUT), dict, path, "the top level", LAYOUT)
        samples = []
        for key, entry in take(list(entries.items()), limit):
            field = lambda k: get_field("mmvet", entry, k, path, f"entry {key}", LAYOUT)  # noqa: E731
            question, answer, capability = str(field("question")), str(field("answer")), field("capability")
            samples.append(Sample(
                id=str(key),
                prompt=question.strip(),
                images=[existing_image("mmvet", data_dir / "images" / str(field("imagename")), LAYOUT)],
                max_new_tokens=self.max_new_tokens,
                meta={"answer": answer, "question": question, "answer_keys": _llava_id(str(key)),
                      "capability": [capability] if isinstance(capability, str) else list(capability)},
            ))
        return samples

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        judge = self.judge or containment_judge
        marks = {s.id: float(judge(s.meta["question"], s.meta["answer"], answer_of(predictions, s))) for s in samples}
        capabilities, integrations = defaultdict(list), defaultdict(list)
        for s in samples:
            for cap in sorted(set(s.meta["capability"])):
                capabilities[cap].append(marks[s.id])
            integrations["_".join(sorted(set(s.meta["capability"])))].append(marks[s.id])
        about = judge.describe() if hasattr(judge, "describe") else {
            "kind": "containment" if judge is containment_judge else "custom",
            "name": getattr(judge, "__name__", type(judge).__name__), "comparable_to_published": False}
        return {
            "score": percent(marks.values()),
            "capabilities": {c: percent(v) for c, v in sorted(capabilities.items())},
            "capability_integrations": {c: percent(v) for c, v in sorted(integrations.items())},
            "comparable_to_published": about["comparable_to_published"],
            "judge": about,
            "n": len(samples),
            "missing_predictions": n_missing(samples, predictions),
        }
