"""Answer files (LLaVA's JSON-lines convention), result records and the teacher-vs-student table."""

import json

import pytest

from matvlm.errors import MatvlmError
from matvlm.eval.benchmarks import (PAPER_COLUMNS, compare_table, get_benchmark, paper_average, read_predictions,
                                    results_json, write_predictions)


def test_answer_file_appends_and_reads_back(tmp_path):
    path = tmp_path / "answers" / "pope.jsonl"   # folders are created
    write_predictions(path, {"random/1": "Yes", "random/2": "No, there isn't."})
    write_predictions(path, {"random/3": "Ünïcode ok", "random/1": "No"})   # a rerun appends; later line wins
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"question_id": "random/1", "text": "Yes"} and len(lines) == 4
    assert read_predictions(path) == {"random/1": "No", "random/2": "No, there isn't.", "random/3": "Ünïcode ok"}


def test_answer_file_from_llava_with_integer_ids(tmp_path):
    path = tmp_path / "llava.jsonl"
    path.write_text('{"question_id": 34602, "prompt": "q", "text": "2", "answer_id": "x"}\n')
    assert read_predictions(path) == {"34602": "2"}


def test_interrupted_write_is_skipped_then_repaired(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": "a", "text": "1"}\n{"question_id": "b", "te')   # killed mid-line
    assert read_predictions(path) == {"a": "1"}
    write_predictions(path, {"b": "2"})
    assert read_predictions(path) == {"a": "1", "b": "2"}
    assert path.read_text().count("\n") == 2


def test_bad_answer_lines_and_missing_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"question_id": "a", "text": "1"}\nnot json\n{"question_id": "b", "text": "2"}\n')
    with pytest.raises(MatvlmError, match=r"a\.jsonl line 2: not a JSON object with 'question_id' and 'text'"):
        read_predictions(path)
    with pytest.raises(MatvlmError, match=r"answer file .*absent\.jsonl not found"):
        read_predictions(tmp_path / "absent.jsonl")
    assert read_predictions(tmp_path / "absent.jsonl", missing_ok=True) == {}


def test_results_json_shape():
    assert results_json("gqa", 3, {"accuracy": 50.0}) == {"benchmark": "gqa", "n": 3, "metrics": {"accuracy": 50.0}}


# MaTVLM Tables 1-4 headline numbers, columns MME-P MMB VQAT GQA MM-Vet SQA-I POPE MMMU VQAv2, and the paper's AVG
PAPER_ROWS = {
    "teacher TinyLLaVA (Table 1)": ([1466.4, 66.1, 60.3, 62.1, 37.5, 73.0, 87.2, 38.4, 80.1], 64.2),
    "hybrid 12.5%": ([1464.9, 58.7, 57.5, 61.2, 35.4, 67.2, 85.8, 38.0, 78.9], 61.8),
    "hybrid 25%": ([1484.1, 61.2, 57.7, 61.5, 35.4, 68.0, 86.0, 37.3, 79.0], 62.3),
    "hybrid 50%": ([1427.8, 59.4, 54.3, 60.8, 30.5, 64.9, 85.8, 34.8, 78.6], 60.1),
    "all at the beginning": ([1406.5, 60.8, 56.1, 61.2, 32.9, 64.3, 86.1, 33.0, 78.8], 60.4),
    "L_ce only": ([1284.0, 56.4, 45.3, 57.5, 29.0, 59.6, 86.0, 28.0, 74.8], 55.6),
}


@pytest.mark.parametrize("row", list(PAPER_ROWS))
def test_paper_average_reproduces_the_tables(row):
    values, avg = PAPER_ROWS[row]
    assert round(paper_average(dict(zip(PAPER_COLUMNS, values))), 1) == avg


def records(values, **extra_metrics):
    return [results_json(name, 10, {get_benchmark(name).headline: v, **extra_metrics.get(name, {})})
            for name, v in zip(PAPER_COLUMNS, values)]


def test_compare_table_side_by_side_with_paper_average():
    teacher = records(PAPER_ROWS["teacher TinyLLaVA (Table 1)"][0])
    student = {r["benchmark"]: r for r in records(PAPER_ROWS["hybrid 25%"][0])}   # a dict by name works too
    table = compare_table(teacher, student)
    lines = table.splitlines()
    assert lines[0].split() == ["benchmark", "teacher", "student", "delta"]
    assert lines[1].split() == ["MME-P", "1466.4", "1484.1", "+17.7"]
    assert lines[2].split() == ["MMB", "66.1", "61.2", "-4.9"]
    assert lines[10].split() == ["AVG", "64.2", "62.3", "-2.0"]   # 62.256 - 64.224
    assert "student keeps 96.9 % of teacher's average" in table


def test_compare_table_partial_runs_and_offline_marks():
    a = [results_json("mme", 4, {"perception": 1400.0}), results_json("pope", 4, {"f1": 80.0}),
         results_json("mmvet", 4, {"score": 30.0, "comparable_to_published": False})]
    b = [results_json("mme", 4, {"perception": 1200.0}), results_json("pope", 4, {"f1": 90.0})]
    table = compare_table(a, b, names=("A", "B"))
    avg_line = next(line for line in table.splitlines() if line.startswith("AVG"))
    # over the benchmarks both have: A (70 + 80) / 2 = 75, B (60 + 90) / 2 = 75
    assert avg_line.split() == ["AVG", "(2", "of", "9)", "75.0", "75.0", "+0.0"]
    assert any(line.split() == ["MM-Vet*", "30.0", "-", "-"] for line in table.splitlines())
    assert "not comparable to published numbers" in table
    with pytest.raises(MatvlmError, match="result records"):
        compare_table([{"accuracy": 1}], b)
