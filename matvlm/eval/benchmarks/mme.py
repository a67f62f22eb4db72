"""MME (Fu et al. 2023): 14 yes/no subtasks, two questions per image.

Layout of the release (``MME_Benchmark_release_version``), one folder per category, either
``<category>/images/<img>.jpg|png`` + ``<category>/questions_answers_YN/<img>.txt`` or flat
``<category>/<img>.png|jpg`` + ``<category>/<img>.txt``; each txt holds two lines
``question<TAB>Yes|No`` (as read by LLaVA's playground/data/eval/MME/convert_answer_to_mme.py).

Scoring per MME's ``eval_tool/calculation.py``: per category, acc = % of questions right and
acc+ = % of images with both questions right; category score = acc + acc+ (0..200); perception =
sum over the 10 perception categories (MaTVLM's "MME-P"), cognition = sum over the 4 others.

Answer ids: matvlm's own "<category>/<image>/<0|1>"; LLaVA's llava_mme.jsonl gives both questions of
an image one id, the image path under the release folder ("code_reasoning/0020.png",
"artwork/images/14777.jpg"), told apart by the question in the answer's "prompt"; MME's eval_tool
result files name "<category>.txt" and the image (or LLaVA's "<stem>.txt") beside the question.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from matvlm.eval.scoring import mme_yes_no

from .base import SHORT_ANSWER, ImageFile, Sample, answer_of, layout_error, n_missing, percent, take_groups
from .results import question_key

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
LAYOUT = ("<data_dir>/<category>/ (MME_Benchmark_release_version) holding images/<img>.jpg|png + "
          "questions_answers_YN/<img>.txt, or flat <img>.png|jpg + <img>.txt; "
          "each txt two lines 'question<TAB>Yes|No'")
_IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")


@dataclass
class MME:
    """MME reader and scorer. Prompt: the question without MME's "Please answer yes or no." plus
    LLaVA's short-answer suffix (what LLaVA's llava_mme.jsonl holds, per convert_answer_to_mme.py,
    and lmms-eval's mme task)."""

    max_new_tokens: int = 128  # LLaVA's model_vqa_loader.py default

    name: ClassVar[str] = "mme"
    label: ClassVar[str] = "MME-P"
    headline: ClassVar[str] = "perception"

    def load(self, data_dir: Path, limit: int | None = None) -> list[Sample]:
        root = _release_root(Path(data_dir))
        present = [c for c in PERCEPTION + COGNITION if (root / c).is_dir()]
        if not present:
            raise layout_error("mme", root, "none of the 14 MME category folders found", LAYOUT)
        groups = [group for c in present for group in self._category(root / c)]
        for s in (s for group in groups for s in group):
            image, question = s.meta["path"], question_key(s.prompt)
            short = f"{s.meta['category']}/{Path(s.meta['image']).stem}"
            s.meta["answer_keys"] = (f"{image}\t{question}", f"{short}\t{question}", image, short)
        return take_groups(groups, limit)

    def _category(self, folder: Path) -> list[list[Sample]]:
        """One group (the image's two questions) per image of a category folder."""
        nested = (folder / "images").is_dir()
        qa_dir = folder / "questions_answers_YN" if nested else folder
        image_dir = folder / "images" if nested else folder
        if not qa_dir.is_dir():
            raise layout_error("mme", qa_dir, "no such directory", LAYOUT)
        groups = []
        for txt in sorted(qa_dir.glob("*.txt")):
            image = _image_for(image_dir, txt)
            groups.append([
                Sample(
                    id=f"{folder.name}/{image.name}/{k}",
                    prompt=question.replace("Please answer yes or no.", "").strip() + "\n" + SHORT_ANSWER,
                    images=[ImageFile(image)],
                    max_new_tokens=self.max_new_tokens,
                    meta={"category": folder.name, "image": image.name, "answer": answer, "question": question,
                          "path": image.relative_to(folder.parent).as_posix()},
                )
                for k, (question, answer) in enumerate(_read_pair(txt))
            ])
        if not groups:
            raise layout_error("mme", qa_dir, "category folder has no <img>.txt files", LAYOUT)
        return groups

    def score(self, samples: list[Sample], predictions: dict[str, str]) -> dict:
        right = defaultdict(lambda: defaultdict(list))  # category -> image -> [bool per question]
        for s in samples:
            parsed = mme_yes_no(answer_of(predictions, s))
            right[s.meta["category"]][s.meta["image"]].append(parsed == s.meta["answer"])
        categories = {}
        for category, images in right.items():
            acc = percent(ok for oks in images.values() for ok in oks)
            acc_plus = percent(all(oks) for oks in images.values())
            categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                                    "images": len(images)}
        perception = sum(categories[c]["score"] for c in PERCEPTION if c in categories)
        cognition = sum(categories[c]["score"] for c in COGNITION if c in categories)
        return {
            "perception": perception,
            "cognition": cognition,
            "total": perception + cognition,
            "categories": categories,
            "missing_categories": [c for c in PERCEPTION + COGNITION if c not in categories],
            "missing_predictions": n_missing(samples, predictions),
        }


def _release_root(data_dir: Path) -> Path:
    """The folder holding the category folders: data_dir itself or its release subfolder."""
    if not data_dir.is_dir():
        raise layout_error("mme", data_dir, "no such directory", LAYOUT)
    if any((data_dir / c).is_dir() for c in PERCEPTION + COGNITION):
        return data_dir
    for sub in ("MME_Benchmark_release_version", "MME_Benchmark"):
        if (data_dir / sub).is_dir():
            return _release_root(data_dir / sub)
    return data_dir


def _image_for(image_dir: Path, txt: Path) -> Path:
    for suffix in _IMAGE_SUFFIXES:
        if (image_dir / (txt.stem + suffix)).is_file():
            return image_dir / (txt.stem + suffix)
    raise layout_error("mme", image_dir / (txt.stem + ".jpg|.png"), f"image for {txt} missing", LAYOUT)


def _read_pair(txt: Path) -> list[tuple[str, str]]:
    """The two (question, "yes"|"no") pairs of an image's txt."""
    lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = []
    for n, line in enumerate(lines, 1):
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
            raise layout_error("mme", txt, f"line {n} is {line[:60]!r}, not 'question<TAB>Yes|No'", LAYOUT)
        pairs.append((parts[0].strip(), parts[1].strip().lower()))
    if len(pairs) != 2:
        raise layout_error("mme", txt, f"{len(pairs)} questions, MME pairs 2 per image", LAYOUT)
    return pairs

