"""Scoring saved answers: the answer files LLaVA's evaluation scripts write (their question ids, per
haotian-liu/LLaVA's playground/data/eval question files), matvlm's own, and missing answers."""

import json

import pytest

from matvlm.cli import main
from matvlm.errors import MatvlmError
from matvlm.eval.benchmarks import get_benchmark
from matvlm.eval.run import evaluate

from .test_benchmarks import (SHORT, jsonl, mme_release, mmbench_tsv, mmvet_data, png, pope_data, sqa_data,
                              textvqa_data, vqav2_data, write)


def llava_lines(path, rows):
    """An answer file as llava/eval/model_vqa_loader.py writes it."""
    return jsonl(path, [{"question_id": qid, "prompt": prompt, "text": text, "answer_id": "x", "model_id": "m",
                         "metadata": {}} for qid, prompt, text in rows])


def scored(bench, data, path, **kw):
    return evaluate(bench, data, predictions=path, **kw)


# ------------------------------------------------------------------------------------------ POPE


def pope_three_splits(root):
    pope_data(root)
    jsonl(root / "coco" / "coco_pope_adversarial.json", [
        {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a thing {i}?", "label": lab}
        for i, lab in enumerate(["yes", "no"])])
    return root


def test_pope_llava_answer_file_is_matched_by_llava_ids(tmp_path, capsys):
    """The issue's case: llava_pope_test.jsonl numbers adversarial 1.., random 10000001.., popular
    20000001..; those answers used to be read as missing ("yes") and score 0.00 with exit 0."""
    data = pope_three_splits(tmp_path / "pope")
    texts = {"random": ["Yes", "No", "Yes", "No"], "popular": ["Yes", "No", "Yes", "No"], "adversarial": ["Yes", "No"]}
    offset = {"adversarial": 0, "random": 10_000_000, "popular": 20_000_000}
    rows = [(offset[split] + i + 1, f"Is there a thing {i}?" + SHORT, t) for split, ts in texts.items()
            for i, t in enumerate(ts)]
    answers = llava_lines(tmp_path / "answers.jsonl", rows)
    assert main(["eval", "--benchmark", "pope", "--data", str(data), "--predictions", str(answers),
                 "--output", str(tmp_path / "r.json")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["missing_answers"] == 0 and record["metrics"]["missing_predictions"] == 0
    assert record["metrics"]["splits"]["random"]["accuracy"] == pytest.approx(50)   # labels yes yes no no
    assert record["metrics"]["splits"]["adversarial"]["accuracy"] == pytest.approx(100)
    assert "0 questions without an answer" in capsys.readouterr().out
    own = {s.id: t for s in get_benchmark("pope").load(data)
           for t in [texts[s.meta["split"]][int(s.id.split("/")[1]) - 1]]}
    assert get_benchmark("pope").score(get_benchmark("pope").load(data), own) == record["metrics"]


def test_pope_bare_ids_of_a_single_split(tmp_path):
    jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?",
                                                "label": "no"}])
    png(tmp_path / "val2014" / "a.jpg")
    answers = llava_lines(tmp_path / "a.jsonl", [(1, "Is there a cat?", "No")])   # model_vqa_loader on the coco file
    assert scored("pope", tmp_path, answers)["metrics"]["accuracy"] == pytest.approx(100)


# ------------------------------------------------------------------------------------------- MME


def mme_llava_rows(answers):
    """llava_mme.jsonl ids: the image path under the release folder, shared by its two questions."""
    q = "\nAnswer the question using a single word or phrase."
    return [("existence/000.png", "Is there a dog in this image?" + q, answers[0]),
            ("existence/000.png", "Is there a cat?" + q, answers[1]),
            ("existence/001.jpg", "Is there a car?" + q, answers[2]),
            ("existence/001.jpg", "Is there a bus?" + q, answers[3]),
            ("artwork/images/10002.jpg", "Is it Baroque?" + q, answers[4]),
            ("artwork/images/10002.jpg", "Is it Gothic?" + q, answers[5]),
            ("code_reasoning/0020.png", "Does it print 3?" + q, answers[6]),
            ("code_reasoning/0020.png", "Does it print 4?" + q, answers[7])]


def test_mme_llava_answer_file_and_eval_tool_results(tmp_path):
    mme_release(tmp_path / "mme")
    texts = ["Yes", "No", "Yes", "Yes", "No", "No", "Yes", "No"]
    rows = mme_llava_rows(texts)
    # order shuffled within an image: the prompt tells the two questions apart
    llava = llava_lines(tmp_path / "llava.jsonl", [rows[1], rows[0]] + rows[2:])
    record = scored("mme", tmp_path / "mme", llava)
    samples = get_benchmark("mme").load(tmp_path / "mme")
    expected = get_benchmark("mme").score(samples, {s.id: t for s, t in zip(samples, texts)})
    assert record["metrics"] == expected and record["missing_answers"] == 0
    # MME's eval_tool layout: <category>.txt, image TAB question TAB truth TAB prediction
    results = tmp_path / "eval_tool" / "answers" / "llava"
    truth = ["Yes", "No", "No", "Yes", "Yes", "No", "Yes", "No"]
    for category in ("existence", "artwork", "code_reasoning"):
        lines = [f"{image.rsplit('/', 1)[1].split('.')[0]}.txt\t{prompt.split(chr(10))[0]} Please answer yes or no."
                 f"\t{t}\t{text}" for (image, prompt, text), t in zip(rows, truth) if image.startswith(category)]
        write(results / f"{category}.txt", "\n".join(lines) + "\n")
    assert scored("mme", tmp_path / "mme", results)["metrics"] == expected


# ------------------------------------------------------------------------------ ScienceQA, GQA, VQAv2


def test_scienceqa_llava_string_ids_and_extra_text_only_answers(tmp_path):
    sqa_data(tmp_path)
    answers = llava_lines(tmp_path / "a.jsonl", [("1", "Which animal...", "B"), ("2", "What...", "A"),
                                                 ("3", "Text only?", "A")])   # model_vqa_science.py answers all
    record = scored("sqa-img", tmp_path, answers)
    assert record["metrics"]["accuracy"] == pytest.approx(100) and record["answers_not_matched"] == 1


def test_vqav2_and_gqa_llava_ids(tmp_path):
    vqav2_data(tmp_path / "vqav2")
    answers = llava_lines(tmp_path / "v.jsonl", [(4201, "q", "Two"), (701, "q", "Yes"), (702, "q", "dogs")])
    assert scored("vqav2", tmp_path / "vqav2", answers)["metrics"]["accuracy"] == pytest.approx(200 / 3)
    write(tmp_path / "gqa" / "testdev_balanced_questions.json", json.dumps(
        {"201307251": {"question": "Is it overcast?", "imageId": "n1", "answer": "no"}}))
    png(tmp_path / "gqa" / "images" / "n1.jpg")
    answers = llava_lines(tmp_path / "g.jsonl", [("201307251", "Is it overcast?" + SHORT, "No")])
    assert scored("gqa", tmp_path / "gqa", answers)["metrics"]["accuracy"] == pytest.approx(100)


# --------------------------------------------------------------------------------------- TextVQA


def test_textvqa_llava_ids_are_image_ids_told_apart_by_question(tmp_path):
    textvqa_data(tmp_path)
    write(tmp_path / "TextVQA_0.5.1_val.json", json.dumps({"data": [
        {"question_id": 34602, "question": "how many cups?", "image_id": "img1", "answers": ["2"] * 10},
        {"question_id": 34605, "question": "What brand?", "image_id": "img1", "answers": ["dakota"] * 10},
        {"question_id": 34603, "question": "what brand is it?", "image_id": "img2", "answers": ["coke"] * 10}]}))
    ocr = "\nReference OCR token: dakota, digital"
    answers = llava_lines(tmp_path / "a.jsonl", [   # llava_textvqa_val_v051_ocr.jsonl: question_id = image_id
        ("img1", "What brand?" + ocr + SHORT, "Dakota"), ("img1", "how many cups?" + ocr + SHORT, "2"),
        ("img2", "what brand is it?" + SHORT, "pepsi")])
    record = scored("textvqa", tmp_path, answers)
    assert record["metrics"]["accuracy"] == pytest.approx(200 / 3) and record["missing_answers"] == 0


# --------------------------------------------------------------------------------------- MMBench


def test_mmbench_llava_rows_with_round_ids(tmp_path):
    import base64

    b64 = base64.b64encode(png()).decode()
    row = {"question": "What animal?", "hint": "nan", "A": "cat", "B": "dog", "answer": "B", "category": "c",
           "image": b64}
    # the published dev TSV carries its rotated copies (index + k * 1e6); mmbench.sh runs one round each
    mmbench_tsv(tmp_path / "dev" / "mmbench_dev_20230712.tsv", [
        {**row, "index": 241}, {**row, "index": 1000241, "A": "dog", "B": "cat", "answer": "A"}])
    answers = jsonl(tmp_path / "a.jsonl", [
        {"question_id": 241, "round_id": 0, "prompt": "p", "text": "B", "options": ["cat", "dog"],
         "option_char": ["A", "B"]},
        {"question_id": 1000241, "round_id": 0, "prompt": "p", "text": "A", "options": ["dog", "cat"],
         "option_char": ["A", "B"]}])
    assert scored("mmbench", tmp_path / "dev", answers)["metrics"]["accuracy"] == pytest.approx(100)
    # a TSV without copies: --all-rounds' round k is matvlm's rotation k
    mmbench_tsv(tmp_path / "plain" / "mmbench_dev_20230712.tsv", [{**row, "index": 241}])
    answers = jsonl(tmp_path / "r.jsonl", [{"question_id": 241, "round_id": 0, "text": "B"},
                                           {"question_id": 241, "round_id": 1, "text": "A"}])
    record = scored("mmbench", tmp_path / "plain", answers)
    assert record["metrics"]["accuracy"] == pytest.approx(100) and record["missing_answers"] == 0


# ---------------------------------------------------------------------------------- MMMU, MM-Vet


def test_mmmu_answers_as_a_json_object(tmp_path):
    png(tmp_path / "images" / "a.png")
    rec = {"id": "validation_Physics_3", "question": "Speed in <image 1>?", "options": ["1 m/s", "2 m/s"],
           "answer": "B", "question_type": "multiple-choice", "image_1": "images/a.png"}
    write(tmp_path / "mmmu.json", json.dumps([rec]))
    answers = write(tmp_path / "out" / "llava.json", json.dumps({"validation_Physics_3": "B"}))   # MMMU's run_llava.py
    assert scored("mmmu", tmp_path, answers)["metrics"]["accuracy"] == pytest.approx(100)


def test_mmvet_llava_integer_ids_and_converted_results(tmp_path):
    mmvet_data(tmp_path)
    llava = llava_lines(tmp_path / "a.jsonl", [(0, "What is x?", "five"), (1, "q", "cat and dog"), (2, "q", "1999")])
    record = scored("mmvet", tmp_path, llava)
    assert record["metrics"]["score"] == pytest.approx(200 / 3) and record["missing_answers"] == 0
    converted = write(tmp_path / "llava.json", json.dumps({"v1_0": "five", "v1_1": "cat and dog", "v1_2": "1999"}))
    assert scored("mmvet", tmp_path, converted)["metrics"] == record["metrics"]


# ----------------------------------------------------------------------------------- missing answers


def test_missing_answers_are_an_error_naming_ids_unless_allowed(tmp_path, capsys):
    data = pope_three_splits(tmp_path / "pope")
    answers = llava_lines(tmp_path / "a.jsonl", [(10_000_001, "q", "Yes"), (10_000_002, "q", "No")])
    args = ["eval", "--benchmark", "pope", "--data", str(data), "--predictions", str(answers),
            "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pope: 8 of 10 questions have no answer" in err and "'random/3'" in err and "10000003" in err
    assert "'10000001'" in err and "--allow-missing" in err
    assert not (tmp_path / "r.json").exists()                       # nothing written
    assert main(args + ["--allow-missing"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["missing_answers"] == 8 and record["metrics"]["missing_predictions"] == 8
    assert "8 questions without an answer" in capsys.readouterr().out


def test_an_answer_file_matching_nothing_is_an_error_even_when_missing_is_allowed(tmp_path):
    data = pope_data(tmp_path / "pope")
    answers = jsonl(tmp_path / "a.jsonl", [{"question_id": "nope/1", "text": "Yes"}])
    with pytest.raises(MatvlmError, match=r"pope: 8 of 8 questions have no answer .*nothing can be scored"):
        scored("pope", data, answers, allow_missing=True)


def test_answer_file_formats_and_bad_input(tmp_path):
    from matvlm.eval.benchmarks.results import read_answer_rows

    assert [r.question_id for r in read_answer_rows(write(tmp_path / "l.json", json.dumps(
        [{"questionId": "7", "prediction": "no"}])))] == ["7"]                # convert_gqa_for_eval.py output
    with pytest.raises(MatvlmError, match=r"x\.json: a JSON object whose values are not all text"):
        read_answer_rows(write(tmp_path / "x.json", json.dumps({"a": 1})))
    with pytest.raises(MatvlmError, match=r"bad\.txt line 1: 2 tab-separated fields, expected 4"):
        read_answer_rows(write(tmp_path / "bad.txt", "a\tb\n"))
    with pytest.raises(MatvlmError, match=r"e\.jsonl line 1: not a JSON object with 'question_id' and 'text'"):
        read_answer_rows(write(tmp_path / "e.jsonl", '{"id": 1, "text": "x"}\n'))


def test_own_ids_win_and_a_later_line_wins(tmp_path):
    from matvlm.eval.benchmarks.results import match_answers, read_answer_rows

    samples = get_benchmark("pope").load(pope_data(tmp_path))
    rows = read_answer_rows(jsonl(tmp_path / "a.jsonl", [{"question_id": "random/1", "text": "No"},
                                                         {"question_id": "random/1", "text": "Yes"}]))
    answers, unmatched = match_answers(samples, rows)
    assert answers == {"random/1": "Yes"} and unmatched == []
