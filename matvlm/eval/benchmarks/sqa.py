"""ScienceQA-IMG (Lu et al. 2022): the test problems that come with an image.

Layout (lupantech/ScienceQA ``data/scienceqa``, as LLaVA's docs/Evaluation.md places it):
``<data_dir>/problems.json`` ({pid: {question, choices, answer: index, hint, image: "image.png" |
null, subject, ...}}), ``<data_dir>/pid_splits.json`` ({"test": [pid, ...], ...}) and
``<data_dir>/images/test/<pid>/image.png``.

Prompt (LLaVA's CQM-A format of llava_test_CQM-A.json, as lmms-eval's scienceqa_img writes it):
"Context: <hint>" line when there is a hint, the question, options as "A. ..." lines, and
"Answer with the option's letter from the given choices directly."
Scoring per LLaVA's ``llava/eval/eval_science_qa.py``: the letter is parsed by scoring.sqa_letter;
accuracy in percent (LLaVA's "IMG-Accuracy", MaTVLM's "SQA-I").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import sqa_letter

from .base import (OPTION_LETTER, Sample, answer_of, existing_image, expect_type, get_field,
                   layout_error, n_missing, percent, read_json, take)

LAYOUT = ("<data_dir>/problems.json ({pid: {question, choices, answer, hint, image}}) + "
          "<data_dir>/pid_splits.json ({'test': [pid, ...]}) + <data_dir>/images/test/<pid>/image.png")
LETTERS = "ABCDE"


@dataclass
class ScienceQAImg:
    """ScienceQA-IMG reader and scorer."""

    split: str = "test"
    max_new_tokens: int = 128

    name: ClassVar[str] = "sqa-img"
    label: ClassVar[str] = "SQA-I"
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        problems_path, splits_path = data_dir / "problems.json", data_dir / "pid_splits.json"
        problems = expect_type("sqa-img", read_json("sqa-img", problems_path, LAYOUT), dict,
                               problems_path, "the top level", LAYOUT)
        splits = read_json("sqa-img", splits_path, LAYOUT)
        pids = get_field("sqa-img", splits, self.split, splits_path, "the top level", LAYOUT)
        samples = []
        for pid in pids:
            problem = get_field("sqa-img", problems, str(pid), problems_path, "the top level", LAYOUT)
            expect_type("sqa-img", problem, dict, problems_path, f"problem {pid}", LAYOUT)
            if problem.get("image"):
                samples.append(self._sample(str(pid), problem, data_dir, problems_path))
                if limit is not None and len(samples) >= limit:
                    break
        return take(samples, limit)

    def _sample(self, pid: str, problem: dict, data_dir: Path, path: Path) -> Sample:
        field = lambda key: get_field("sqa-img", problem, key, path, f"problem {pid}", LAYOUT)  # noqa: E731
        choices = [str(c) for c in field("choices")]
        answer = field("answer")
        if not 2 <= len(choices) <= len(LETTERS) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise layout_error("sqa-img", path, f"problem {pid}: answer {answer!r} does not index its "
                               f"{len(choices)} choices", LAYOUT)
        hint = str(problem.get("hint") or "").strip()
        lines = ([f"Context: {hint}"] if hint else []) + [str(field("question")).strip()]
        lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)] + [OPTION_LETTER]
        image = data_dir / "images" / self.split / pid / str(field("image"))
        return Sample(
            id=pid,
            prompt="\n".join(lines),
            images=[existing_image("sqa-img", image, LAYOUT)],
            max_new_tokens=self.max_new_tokens,
            meta={"answer": LETTERS[answer], "n_choices": len(choices), "subject": problem.get("subject")},
        )

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        hits = [sqa_letter(answer_of(predictions, s), s.meta["n_choices"]) == s.meta["answer"] for s in samples]
        return {"accuracy": percent(hits), "n": len(samples),
                "missing_predictions": n_missing(samples, predictions)}
