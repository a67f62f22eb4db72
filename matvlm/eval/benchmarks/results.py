"""Answer files, result records and the teacher-vs-student table.

matvlm writes answer files in LLaVA's convention (llava/eval/model_vqa*.py): one JSON object per
line, ``{"question_id": ..., "text": ...}``, keyed by the sample id. They are written by appending,
so an interrupted run is resumed by reading the file, skipping the ids it holds and appending the rest.

It reads, besides its own, the answer files of other tools (read_answer_rows), matched to samples by
match_answers through the ids each reader records in ``meta["answer_keys"]``:

- LLaVA's model_vqa_loader.py / model_vqa.py / model_vqa_science.py lines ``{"question_id", "prompt",
  "text", ...}`` with the ids of LLaVA's question files (haotian-liu/LLaVA, playground/data/eval);
- LLaVA's model_vqa_mmbench.py lines, which add ``"round_id"`` (the option rotation);
- a JSON object ``{id: text}`` (MMMU's run_llava.py output, LLaVA's convert_mmvet_for_eval.py output)
  or a JSON list of ``{"question_id"|"questionId", "text"|"prediction"|"answer"}`` records;
- MME's eval_tool results: a folder of ``<category>.txt`` (or one such file), lines
  ``image<TAB>question<TAB>ground truth<TAB>prediction`` (what eval_tool/calculation.py reads and
  LLaVA's convert_answer_to_mme.py writes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matvlm.errors import MatvlmError

from .base import OPTION_LETTER, SHORT_ANSWER

# MaTVLM Tables 1-4 column order (benchmark registry names).
PAPER_COLUMNS = ("mme", "mmbench", "textvqa", "gqa", "mmvet", "sqa-img", "pope", "mmmu", "vqav2")
MME_SCALE = 20.0  # Table 2's AVG counts MME-P / 20 (2000 points -> a percentage-like 0..100)


def write_predictions(path: str | Path, predictions: Mapping[str, str]) -> None:
    """Append ``{"question_id": id, "text": text}`` lines to an answer file (created with its
    folders if needed). A final line cut short by an interrupted write is dropped first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_last_line(path)
    with path.open("a", encoding="utf-8") as f:
        for qid, text in predictions.items():
            f.write(json.dumps({"question_id": str(qid), "text": str(text)}, ensure_ascii=False) + "\n")
        f.flush()


def read_predictions(path: str | Path, missing_ok: bool = False) -> dict[str, str]:
    """{question id (as text): text} of an answer file (any format read_answer_rows reads); a later
    line for an id wins. An unparsable final line without its newline (an interrupted write) is
    ignored; other bad lines raise. A missing file raises MatvlmError, or gives {} with ``missing_ok``."""
    return {row.question_id: row.text for row in read_answer_rows(path, missing_ok)}


@dataclass(frozen=True)
class AnswerRow:
    """One answer of an answer file: its question id as text, the model's text, and what some
    formats add to tell questions apart (LLaVA's prompt, model_vqa_mmbench.py's round_id)."""

    question_id: str
    text: str
    prompt: str | None = None
    round_id: int | None = None


ANSWER_FORMATS = ("JSON lines {'question_id', 'text'} (matvlm, LLaVA's model_vqa*.py), a JSON object "
                  "{id: text}, a JSON list of {'question_id', 'text'}, or MME's folder of <category>.txt")


def read_answer_rows(path: str | Path, missing_ok: bool = False) -> list[AnswerRow]:
    """The answers of an answer file in any format the module doc lists, in file order.

    A missing file raises MatvlmError, or gives [] with ``missing_ok``; an unreadable one raises a
    one-line MatvlmError naming the file, the line and the formats expected."""
    path = Path(path)
    if path.is_dir():
        return _mme_result_rows(sorted(path.glob("*.txt")), path)
    if not path.is_file():
        if missing_ok:
            return []
        raise MatvlmError(f"answer file {path} not found; expected {ANSWER_FORMATS}")
    if path.suffix == ".txt":
        return _mme_result_rows([path], path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MatvlmError(f"answer file {path} cannot be read ({e}); expected {ANSWER_FORMATS}") from None
    whole = _whole_json(raw)
    if isinstance(whole, dict) and not {"question_id", "text"} & whole.keys():   # not a one-line JSON-lines file
        if not all(isinstance(v, str) for v in whole.values()):
            raise MatvlmError(f"answer file {path}: a JSON object whose values are not all text; expected "
                              f"{ANSWER_FORMATS}")
        return [AnswerRow(str(k), v) for k, v in whole.items()]
    if isinstance(whole, list):
        return [_row(r, path, f"entry {n}") for n, r in enumerate(whole)]
    lines = raw.split("\n")   # not splitlines: U+2028 inside answers
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # the last line, not newline-terminated: cut by an interrupted write
                break
            raise MatvlmError(f"answer file {path} line {n}: not a JSON object with 'question_id' and 'text'; "
                              f"expected {ANSWER_FORMATS}") from None
        rows.append(_row(record, path, f"line {n}"))
    return rows


def _whole_json(raw: str):
    """The file as one JSON value when it is one (an object or a list), else None (JSON lines)."""
    text = raw.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _row(record, path: Path, where: str) -> AnswerRow:
    qid = next((record[k] for k in ("question_id", "questionId") if k in record), None) \
        if isinstance(record, dict) else None
    text = next((record[k] for k in ("text", "prediction", "answer") if k in record), None) \
        if isinstance(record, dict) else None
    if qid is None or not isinstance(text, str) or isinstance(qid, (dict, list)):
        raise MatvlmError(f"answer file {path} {where}: not a JSON object with 'question_id' and 'text'; "
                          f"expected {ANSWER_FORMATS}")
    prompt, round_id = record.get("prompt"), record.get("round_id")
    return AnswerRow(str(qid), text, prompt if isinstance(prompt, str) else None,
                     round_id if isinstance(round_id, int) and not isinstance(round_id, bool) else None)


def _mme_result_rows(files: list[Path], where: Path) -> list[AnswerRow]:
    """MME eval_tool result files: <category>.txt, lines image<TAB>question<TAB>truth<TAB>prediction;
    question ids "<category>/<image stem>" (LLaVA's converter names the image "<stem>.txt")."""
    if not files:
        raise MatvlmError(f"answer folder {where} holds no <category>.txt; expected {ANSWER_FORMATS}")
    rows = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            parts = line.rstrip("\r").split("\t")
            if len(parts) != 4:
                raise MatvlmError(f"MME result file {path} line {n}: {len(parts)} tab-separated fields, expected 4 "
                                  "(image, question, ground truth, prediction)")
            image, question, _truth, prediction = parts
            rows.append(AnswerRow(f"{path.stem}/{Path(image).stem}", prediction.strip(), question))
    return rows


def match_answers(samples: Sequence, rows: Iterable[AnswerRow]) -> tuple[dict[str, str], list[AnswerRow]]:
    """({sample id: text}, rows that name no sample) for answer rows read by read_answer_rows.

    A row names a sample by, in order: its id and the question of its prompt (LLaVA's MME and TextVQA
    question files give several questions one id), its id and round (MMBench rotations; a round above
    0 is matched by that key only), its id. A sample is found under its own id or under the keys its
    reader put in ``meta["answer_keys"]``. Several samples under one key take that key's rows in
    order; a later row for the same sample wins (a resumed run's file)."""
    index: dict[str, list[str]] = {}
    for s in samples:
        index[s.id] = [s.id]
    for s in samples:
        for key in s.meta.get("answer_keys", ()):
            if key not in index or index[key][0] != key:
                index.setdefault(key, []).append(s.id)
    used: dict[str, int] = {}
    answers, unmatched = {}, []
    for row in rows:
        key = next((k for k in row_keys(row) if k in index), None)
        if key is None:
            unmatched.append(row)
            continue
        ids = index[key]
        answers[ids[min(used.get(key, 0), len(ids) - 1)]] = row.text
        used[key] = used.get(key, 0) + 1
    return answers, unmatched


def row_keys(row: AnswerRow) -> list[str]:
    """The keys an answer row may name its sample by, most specific first (see match_answers)."""
    keys = [f"{row.question_id}\t{question_key(row.prompt)}"] if row.prompt else []
    if row.round_id is not None:
        keys.append(f"{row.question_id}\t#{row.round_id}")
        if row.round_id != 0:
            return keys
    return keys + [row.question_id]


def question_key(prompt: str) -> str:
    """A question as answer files spell it, reduced to compare: the answer-format suffixes, TextVQA's
    "Reference OCR token:" line and MME's "Please answer yes or no." dropped, lower case, one space."""
    lines = [line.strip() for line in prompt.split("\n")]
    kept = [line for line in lines if line and line not in (SHORT_ANSWER, OPTION_LETTER)
            and not line.startswith("Reference OCR token:")]
    return " ".join(" ".join(kept).replace("Please answer yes or no.", "").lower().split())


def missing_answers_error(bench: str, samples: Sequence, answers: Mapping[str, str], rows: Sequence[AnswerRow],
                          path: Path | str, allow_missing: bool = False) -> MatvlmError | None:
    """The one-line error for samples without an answer: how many, one expected id (and the id LLaVA's
    files give it) and one id the file holds. None when every sample has one, or with ``allow_missing``
    when some have (a file none of whose answers match is an error either way)."""
    missing = [s for s in samples if s.id not in answers]
    if not missing or (allow_missing and answers):
        return None
    first = missing[0]
    alias = next((k for k in first.meta.get("answer_keys", ()) if "\t" not in k), None)
    expected = repr(first.id) + (f" (LLaVA's {alias})" if alias else "")
    found = f"the file holds e.g. {rows[0].question_id!r}" if rows else "the file holds no answers"
    return MatvlmError(f"{bench}: {len(missing)} of {len(samples)} questions have no answer in {path} "
                       f"(expected e.g. id {expected}; {found}); "
                       + ("none matches a question, so nothing can be scored" if allow_missing
                          else "pass --allow-missing to score them as unanswered"))


def _drop_partial_last_line(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def results_json(benchmark: str, n: int, metrics: dict) -> dict:
    """The result record written next to an answer file: {"benchmark", "n", "metrics"}."""
    return {"benchmark": benchmark, "n": int(n), "metrics": metrics}


def headline(result: Mapping) -> float | None:
    """The number MaTVLM's tables report for a result record (its benchmark's ``headline`` metric)."""
    from . import get_benchmark

    value = result["metrics"].get(get_benchmark(result["benchmark"]).headline)
    return None if value is None else float(value)


def paper_average(values: Mapping[str, float]) -> float:
    """MaTVLM Table 2's AVG of {benchmark: headline}: MME-P / 20 averaged with the percentages."""
    if not values:
        raise MatvlmError("paper_average needs at least one benchmark")
    scaled = [v / MME_SCALE if name == "mme" else v for name, v in values.items()]
    return sum(scaled) / len(scaled)


def compare_table(results_a, results_b, names: tuple[str, str] = ("teacher", "student")) -> str:
    """Two runs side by side: one row per benchmark (its headline metric), the difference, and
    MaTVLM's average (MME-P / 20 with the other benchmarks' percentages) over the benchmarks both
    runs have, with the share of A's average that B keeps.

    Args:
        results_a, results_b: result records (results_json): one, a list, or {name: record}.
        names: column titles for A and B.
    """
    a, b = _headlines(results_a), _headlines(results_b)
    order = [n for n in PAPER_COLUMNS if n in a or n in b] + sorted((a.keys() | b.keys()) - set(PAPER_COLUMNS))
    rows = [(_label(n, results_a, results_b), _fmt(a.get(n)), _fmt(b.get(n)), _delta(a.get(n), b.get(n)))
            for n in order]
    both = [n for n in PAPER_COLUMNS if n in a and n in b]
    notes = []
    if both:
        avg_a, avg_b = paper_average({n: a[n] for n in both}), paper_average({n: b[n] for n in both})
        title = "AVG" if len(both) == len(PAPER_COLUMNS) else f"AVG ({len(both)} of {len(PAPER_COLUMNS)})"
        rows.append((title, _fmt(avg_a), _fmt(avg_b), _delta(avg_a, avg_b)))
        kept = f"; {names[1]} keeps {100 * avg_b / avg_a:.1f} % of {names[0]}'s average" if avg_a else ""
        notes.append(f"AVG: MME-P/{MME_SCALE:g} averaged with the other percentages (MaTVLM Table 2){kept}.")
    if any("*" in r[0] for r in rows):
        notes.append("*: scored by a judge other than the published one, not comparable to published numbers.")
    header = ("benchmark", names[0], names[1], "delta")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]

    def line(row: tuple) -> str:
        return "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))])

    return "\n".join([line(header), *(line(r) for r in rows), *notes])


def _records(results) -> list[Mapping]:
    if isinstance(results, Mapping):
        results = [results] if "benchmark" in results else list(results.values())
    records = list(results) if isinstance(results, Iterable) else []
    for r in records:
        if not (isinstance(r, Mapping) and "benchmark" in r and isinstance(r.get("metrics"), Mapping)):
            raise MatvlmError("results must be result records {'benchmark', 'n', 'metrics'} (see results_json)")
    return records


def _headlines(results) -> dict[str, float]:
    return {r["benchmark"]: v for r in _records(results) if (v := headline(r)) is not None}


def _label(name: str, *all_results) -> str:
    from . import get_benchmark

    offline = any(r["benchmark"] == name and "comparable_to_published" in r["metrics"]
                  and r["metrics"]["comparable_to_published"] is not True
                  for results in all_results for r in _records(results))
    return get_benchmark(name).label + ("*" if offline else "")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b - a:+.1f}"
