"""MMMU (Yue et al. 2024) validation: 900 college-level questions over 30 subjects, multiple-choice
and open, with up to 7 images referenced in the text as "<image 1>", "<image 2>", ...

Layout: the Hugging Face release MMMU/MMMU, ``<data_dir>/<Subject>/validation-*.parquet`` with
columns id ("validation_<Subject>_<n>"), question, options (a Python-literal list as text), answer,
question_type ("multiple-choice" | "open"), image_1 .. image_7 ({"bytes", "path"} or null); or a JSON
/ JSON-lines export ``<data_dir>/*.json[l]`` with the same fields (options may be a list, images may
be paths relative to data_dir).

Prompt and scoring per MMMU-Benchmark/MMMU (``mmmu/utils/data_utils.py`` construct_prompt with
``configs/llava1.5.yaml``; ``mmmu/utils/eval_utils.py``): multiple-choice answers parsed by
scoring.mmmu_parse_choice with one random.Random(42) drawn in sample order for the unparseable
ones; open answers by scoring.mmmu_parse_open / mmmu_open_correct. Accuracy overall, per subject and
per discipline, in percent. The "<image N>" markers stay in the text, as in MMMU's own prompts.
"""

from __future__ import annotations

import ast
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from matvlm.errors import MatvlmError
from matvlm.eval.scoring import mmmu_gold, mmmu_open_correct, mmmu_parse_choice, mmmu_parse_open

from .base import (OPTION_LETTER, SHORT_ANSWER, ImageBytes, Sample, answer_of, existing_image,
                   layout_error, n_missing, percent, read_json, read_jsonl, take)

LAYOUT = ("<data_dir>/<Subject>/validation-*.parquet (MMMU/MMMU: id, question, options, answer, "
          "question_type, image_1..image_7) or <data_dir>/*.json|*.jsonl records with those fields")
SEED = 42  # mmmu/utils/eval_utils.py: random.seed(42)
# mmmu/utils/data_utils.py DOMAIN_CAT2SUB_CAT
DISCIPLINES = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science",
                             "Electronics", "Energy_and_Power", "Materials", "Mechanical_Engineering"),
}
_IMAGE_TAG = re.compile(r"<image (\d+)>")


@dataclass
class MMMU:
    """MMMU reader and scorer.

    Attributes:
        split: "validation" (answers published) — "test" loads but cannot score.
        images: "referenced": every image the question or options mention, in number order
            (lmms-eval's mmmu_doc_to_visual); "first": image_1 only, as MMMU's LLaVA runner and the
            TinyLLaVA/MaTVLM pipeline feed a single-image model.
    """

    split: str = "validation"
    images: Literal["referenced", "first"] = "referenced"
    max_new_tokens: int = 128

    name: ClassVar[str] = "mmmu"
    label: ClassVar[str] = "MMMU"
    headline: ClassVar[str] = "accuracy"

    def __post_init__(self):
        if self.images not in ("referenced", "first"):
            raise MatvlmError(f"MMMU images must be 'referenced' or 'first', got {self.images!r}")

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        data_dir = Path(data_dir)
        records = sorted(_records(data_dir, self.split), key=lambda r: _order(r[0].get("id", "")))
        return [self._sample(rec, path, data_dir) for rec, path in take(records, limit)]

    def _sample(self, rec: dict, path: Path, data_dir: Path) -> Sample:
        where = f"record {rec.get('id', '?')}"
        for key in ("id", "question", "answer", "question_type"):
            if key not in rec:
                raise layout_error("mmmu", path, f"{where} has no field {key!r}", LAYOUT)
        options = _options(rec, path, where)
        question = str(rec["question"])
        if rec["question_type"] == "multiple-choice":
            if not options:
                raise layout_error("mmmu", path, f"{where} is multiple-choice without options", LAYOUT)
            listing = "".join(f"({letter}) {text}\n" for letter, text in options.items())
            prompt = f"{question}\n{listing}\n{OPTION_LETTER}"  # the YAML template folds to "{}\n{}\n..."
        else:
            prompt = f"{question}\n{SHORT_ANSWER}"
        mentioned = sorted({int(n) for n in _IMAGE_TAG.findall(question + " ".join(options.values()))})
        numbers = [1] if self.images == "first" else mentioned
        return Sample(
            id=str(rec["id"]),
            prompt=prompt,
            images=[_image(rec, n, path, data_dir, where) for n in numbers if rec.get(f"image_{n}") is not None],
            max_new_tokens=self.max_new_tokens,
            meta={"answer": mmmu_gold(rec["answer"]), "question_type": str(rec["question_type"]),
                  "options": options, "subject": subject_of(str(rec["id"]))},
        )

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        rng = random.Random(SEED)
        right = {}
        for s in samples:
            text = answer_of(predictions, s)
            if s.meta["question_type"] == "multiple-choice":
                gold = s.meta["answer"]
                golds = gold if isinstance(gold, list) else [gold]
                right[s.id] = mmmu_parse_choice(text, s.meta["options"], rng) in golds
            else:
                right[s.id] = mmmu_open_correct(s.meta["answer"], mmmu_parse_open(text))
        subjects = defaultdict(list)
        for s in samples:
            subjects[s.meta["subject"]].append(right[s.id])
        disciplines = {d: [ok for sub in subs for ok in subjects.get(sub, [])] for d, subs in DISCIPLINES.items()}
        return {
            "accuracy": percent(right.values()),
            "subjects": {k: {"accuracy": percent(v), "n": len(v)} for k, v in sorted(subjects.items())},
            "disciplines": {d: {"accuracy": percent(v), "n": len(v)} for d, v in disciplines.items() if v},
            "n": len(samples),
            "missing_predictions": n_missing(samples, predictions),
        }


def subject_of(sample_id: str) -> str:
    """"validation_Art_Theory_12" -> "Art_Theory" (as MMMU's main_eval_only.py groups)."""
    return "_".join(sample_id.split("_")[1:-1])


def _order(sample_id: str) -> tuple:
    """Subject, then question number: MMMU's own order, which its seeded fallback draws follow."""
    tail = sample_id.rsplit("_", 1)[-1]
    return subject_of(sample_id), int(tail) if tail.isdigit() else 0, sample_id


def _records(data_dir: Path, split: str) -> list[tuple[dict, Path]]:
    """(record, file) pairs from the parquet files of ``split``, else from JSON exports."""
    if not data_dir.is_dir():
        raise layout_error("mmmu", data_dir, "no such directory", LAYOUT)
    parquets = sorted(p for p in data_dir.rglob("*.parquet") if split in p.name)
    if parquets:
        pd = _pandas()
        out = []
        for path in parquets:
            try:
                table = pd.read_parquet(path)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise layout_error("mmmu", path, f"not a readable parquet file ({e})", LAYOUT) from None
            out += [(rec, path) for rec in table.to_dict("records")]
        return out
    exports = sorted(data_dir.glob("*.json")) + sorted(data_dir.glob("*.jsonl"))
    if not exports:
        raise layout_error("mmmu", data_dir, f"no *{split}*.parquet and no *.json/*.jsonl export", LAYOUT)
    out = []
    for path in exports:
        data = read_jsonl("mmmu", path, LAYOUT) if path.suffix == ".jsonl" else read_json("mmmu", path, LAYOUT)
        rows = data.get("data", data.get(split)) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise layout_error("mmmu", path, "not a list of records (or {'data': [...]})", LAYOUT)
        out += [(rec, path) for rec in rows if isinstance(rec, dict) and split in str(rec.get("id", split))]
    return out


def _options(rec: dict, path: Path, where: str) -> dict[str, str]:
    """{letter: option text}; MMMU stores the list as its Python repr."""
    raw = rec.get("options")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return {}
    if isinstance(raw, str):
        try:
            raw = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise layout_error("mmmu", path, f"{where}: options {raw[:40]!r} is not a list literal", LAYOUT) from None
    if hasattr(raw, "tolist"):  # numpy array from parquet
        raw = raw.tolist()
    if not isinstance(raw, list):
        raise layout_error("mmmu", path, f"{where}: options is not a list", LAYOUT)
    return {chr(ord("A") + i): str(text) for i, text in enumerate(raw)}


def _image(rec: dict, n: int, path: Path, data_dir: Path, where: str) -> Any:
    """A lazy loader for image_<n>: parquet {"bytes", "path"}, or a path relative to data_dir."""
    value = rec[f"image_{n}"]
    if isinstance(value, dict) and value.get("bytes"):
        return ImageBytes(bytes(value["bytes"]), source=f"{path} {where} image_{n}")
    relative = value.get("path") if isinstance(value, dict) else value
    if not isinstance(relative, str) or not relative:
        raise layout_error("mmmu", path, f"{where}: image_{n} has neither bytes nor a path", LAYOUT)
    return existing_image("mmmu", data_dir / relative, LAYOUT)


def _pandas():
    try:
        import pandas
        import pyarrow  # noqa: F401  (read_parquet's engine)
    except ImportError:
        raise MatvlmError("MMMU's parquet reader needs pandas and pyarrow: pip install 'matvlm[eval]'") from None
    return pandas

