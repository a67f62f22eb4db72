"""MMBench (Liu et al. 2023) dev, scored with CircularEval.

Layout: ``<data_dir>/mmbench_dev_20230712.tsv`` (the file LLaVA's and MaTVLM's mmbench.sh use; any
single ``*.tsv`` there, or a .tsv path, also works), tab-separated with columns index, question,
hint, A, B, C, D, answer, category, image (base64; or, to save space, the index of the row whose
image it shares, as VLMEvalKit's image_base.py resolves it).

CircularEval (VLMEvalKit's mcq_circular_eval): every question is asked once per rotation of its
options; it counts as right only if every rotation is answered right. Rows whose index is ≥ 1e6 are
rotated copies of row ``index % 1e6`` (the published dev TSV carries them); when a TSV has no such
rows the rotations are generated here the way LLaVA's model_vqa_mmbench.py --all-rounds rotates
(option texts shifted left by one per round; copy k gets index + k·1e6). Answers are read with
scoring.infer_option (VLMEvalKit's exact matching; its GPT fallback cannot run offline, so an
answer it cannot match counts as wrong, as in VLMEvalKit's exact-matching mode).

Answer ids: matvlm's own index (rotated copies included); LLaVA's model_vqa_mmbench.py writes the TSV
row's index as question_id and the rotation as round_id (0 without --all-rounds, as its mmbench.sh
runs), matched to the row and rotation they name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import infer_option

from .base import (OPTION_LETTER, ImageBytes, Sample, answer_of, is_blank, layout_error, n_missing,
                   percent, take_groups)

LAYOUT = ("<data_dir>/mmbench_dev_20230712.tsv (tab-separated; columns index, question, hint, A, B, "
          "C, D, answer, category, image as base64 or the index of a row with the same image)")
LETTERS = "ABCD"
ROTATION = 1_000_000  # VLMEvalKit: g_index = index % 1e6


@dataclass
class MMBench:
    """MMBench reader and CircularEval scorer.

    Prompt (LLaVA's model_vqa_mmbench.py): hint line if any, question, "A. ..." option lines, and
    with ``letter_prompt`` LLaVA's "Answer with the option's letter ..." (--single-pred-prompt, as
    LLaVA's mmbench.sh passes; MaTVLM's scripts/eval/mmbench.sh does not pass it).

    Attributes:
        file: TSV file name inside data_dir (default: mmbench_dev_20230712.tsv, else the only *.tsv).
        circular: generate option rotations when the TSV has none.
        letter_prompt: append the option-letter instruction.
    """

    file: str | None = None
    circular: bool = True
    letter_prompt: bool = True
    max_new_tokens: int = 128

    name: ClassVar[str] = "mmbench"
    label: ClassVar[str] = "MMB"
    headline: ClassVar[str] = "accuracy"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        path = self._tsv(Path(data_dir))
        rows = _read_tsv(path)
        images = {r["index"]: r["image"] for r in rows}
        has_copies = any(r["index"] >= ROTATION for r in rows)
        groups = defaultdict(list)
        for row in rows:
            row["image"] = _resolve_image(row, images, path)
            copies = [row] if has_copies or not self.circular else _rotations(row)
            groups[row["index"] % ROTATION] += [self._sample(r, path) for r in copies]
        return take_groups(groups.values(), limit)

    def _tsv(self, data_dir: Path) -> Path:
        if data_dir.suffix == ".tsv":
            candidates = [data_dir]
        elif self.file:
            candidates = [data_dir / self.file]
        elif (data_dir / "mmbench_dev_20230712.tsv").is_file():
            candidates = [data_dir / "mmbench_dev_20230712.tsv"]
        else:
            candidates = sorted(data_dir.glob("*.tsv")) if data_dir.is_dir() else []
        if len(candidates) != 1 or not candidates[0].is_file():
            found = ", ".join(p.name for p in candidates) or "none"
            raise layout_error("mmbench", data_dir / (self.file or "mmbench_dev_20230712.tsv"),
                               f"no single MMBench TSV (found: {found})", LAYOUT)
        return candidates[0]

    def _sample(self, row: dict, path: Path) -> Sample:
        options = row["options"]
        lines = ([row["hint"]] if not is_blank(row["hint"]) else []) + [row["question"]]
        lines += [f"{k}. {v}" for k, v in options.items()] + ([OPTION_LETTER] if self.letter_prompt else [])
        return Sample(
            id=str(row["index"]),
            prompt="\n".join(lines),
            images=[ImageBytes(row["image"], source=f"{path} index {row['index']}")],
            max_new_tokens=self.max_new_tokens,
            meta={"answer": row["answer"], "options": options, "group": row["index"] % ROTATION,
                  "category": row["category"], "answer_keys": (f"{row['source']}\t#{row['round']}",)},
        )

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        if any(s.meta["answer"] is None for s in samples):
            raise layout_error("mmbench", "the TSV", "rows without an 'answer' (a test split?) cannot "
                               "be scored offline", LAYOUT)
        right = defaultdict(list)  # group -> [bool per rotation]
        category = {}
        for s in samples:
            parsed = infer_option(answer_of(predictions, s), s.meta["options"])
            right[s.meta["group"]].append(parsed == s.meta["answer"])
            category[s.meta["group"]] = s.meta["category"]
        vanilla = [infer_option(answer_of(predictions, s), s.meta["options"]) == s.meta["answer"]
                   for s in samples if int(s.id) < ROTATION]
        by_category = defaultdict(list)
        for group, oks in right.items():
            by_category[category[group]].append(all(oks))
        return {
            "accuracy": percent(all(oks) for oks in right.values()),
            "vanilla_accuracy": percent(vanilla),
            "categories": {c: percent(v) for c, v in sorted(by_category.items())},
            "questions": len(right),
            "n": len(samples),
            "missing_predictions": n_missing(samples, predictions),
        }


def _read_tsv(path: Path) -> list[dict]:
    """Rows as {index: int, question, hint, options: {letter: text}, answer, category, image}."""
    pd = _pandas()
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise layout_error("mmbench", path, f"not a readable TSV ({e})", LAYOUT) from None
    missing = [c for c in ("index", "question", "A", "B", "image") if c not in table.columns]
    if missing:
        raise layout_error("mmbench", path, f"missing columns {missing}", LAYOUT)
    rows = []
    for n, rec in enumerate(table.to_dict("records"), 2):  # line 1 is the header
        try:
            index = int(float(rec["index"]))
        except ValueError:
            raise layout_error("mmbench", path, f"line {n}: index {rec['index']!r} is not a number", LAYOUT) from None
        options = {k: str(rec[k]) for k in LETTERS if k in rec and not is_blank(rec[k])}
        answer = None if is_blank(rec.get("answer")) else str(rec["answer"]).strip()
        if answer is not None and answer not in options:
            raise layout_error("mmbench", path, f"line {n}: answer {answer!r} is not one of the options "
                               f"{list(options)}", LAYOUT)
        rows.append({"index": index, "source": index, "round": 0, "question": str(rec["question"]),
                     "hint": rec.get("hint"),
                     "options": options, "answer": answer, "category": rec.get("category") or "",
                     "image": str(rec["image"])})
    return rows


def _resolve_image(row: dict, images: dict[int, str], path: Path) -> str:
    """The row's base64 image, following a short numeric reference to another row's image."""
    image = row["image"]
    if len(image) <= 64:
        ref = int(image) if image.strip().isdigit() else None
        if ref is None or len(images.get(ref, "")) <= 64:
            raise layout_error("mmbench", path, f"index {row['index']}: image {image!r} is neither base64 "
                               "nor the index of a row with an image", LAYOUT)
        image = images[ref]
    return image


def _rotations(row: dict) -> list[dict]:
    """The row and its option rotations: copy k shows option texts[k:] + texts[:k] under A, B, ...
    and gets index + k·1e6 (LLaVA's --all-rounds order, VLMEvalKit's index convention)."""
    letters, texts = list(row["options"]), list(row["options"].values())
    copies = []
    for k in range(len(texts)):
        shifted = texts[k:] + texts[:k]
        answer = None if row["answer"] is None else letters[(letters.index(row["answer"]) - k) % len(letters)]
        copies.append({**row, "index": row["index"] + k * ROTATION, "options": dict(zip(letters, shifted)),
                       "answer": answer, "round": k})
    return copies


def _pandas():
    try:
        import pandas
    except ImportError:
        from matvlm.errors import MatvlmError

        raise MatvlmError("MMBench's TSV reader needs pandas: pip install 'matvlm[eval]'") from None
    return pandas
