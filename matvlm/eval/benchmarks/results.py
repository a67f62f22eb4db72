"""Answer files, result records and the teacher-vs-student table.

Answer files follow LLaVA's convention (llava/eval/model_vqa*.py): one JSON object per line,
``{"question_id": ..., "text": ...}``. They are written by appending, so an interrupted run is
resumed by reading the file, skipping the ids it holds and appending the rest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from matvlm.errors import MatvlmError

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
    """{question id (as text): text} of an answer file; a later line for an id wins. An unparsable
    final line without its newline (an interrupted write) is ignored; other bad lines raise.
    A missing file raises MatvlmError, or gives {} with ``missing_ok``."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise MatvlmError(f"answer file {path} not found; expected JSON lines {{'question_id', 'text'}}")
    raw = path.read_text(encoding="utf-8")
    lines = raw.split("\n")
    out = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[str(row["question_id"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):  # the last line, not newline-terminated: cut by an interrupted write
                break
            raise MatvlmError(f"answer file {path} line {n}: not a JSON object with 'question_id' and "
                              "'text'") from None
    return out


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
        notes.append("*: scored by an offline judge, not comparable to published numbers.")
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

    offline = any(r["benchmark"] == name and r["metrics"].get("comparable_to_published") is False
                  for results in all_results for r in _records(results))
    return get_benchmark(name).label + ("*" if offline else "")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{b - a:+.1f}"
