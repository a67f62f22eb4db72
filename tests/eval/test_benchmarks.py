"""Readers and scorers on tiny files in each benchmark's published layout, with hand-computed scores."""

import base64
import io
import json

import pytest
from PIL import Image

from matvlm.errors import MatvlmError
from matvlm.eval.benchmarks import BENCHMARKS, get_benchmark, load_images

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def png(path=None, size=(4, 3), color=(200, 10, 10)):
    """Write a tiny image to ``path`` (format from its suffix), or return PNG bytes."""
    im = Image.new("RGB", size, color)
    if path is None:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def assert_clean_prompts(samples):
    for s in samples:
        assert "<image>" not in s.prompt and s.max_new_tokens > 0
    assert len({s.id for s in samples}) == len(samples)


# ------------------------------------------------------------------------------------------- MME


def mme_release(root):
    rel = root / "MME_Benchmark_release_version"
    q = " Please answer yes or no."
    for name, lines in [("000.png", ["Is there a dog in this image?" + q + "\tYes", "Is there a cat?" + q + "\tNo"]),
                        ("001.jpg", ["Is there a car?" + q + "\tNo", "Is there a bus?" + q + "\tYes"])]:
        png(rel / "existence" / name)
        write(rel / "existence" / name.replace(name[-4:], ".txt"), "\n".join(lines) + "\n")
    png(rel / "artwork" / "images" / "10002.jpg")
    write(rel / "artwork" / "questions_answers_YN" / "10002.txt", f"Is it Baroque?{q}\tYes\nIs it Gothic?{q}\tNo\n")
    png(rel / "code_reasoning" / "0020.png")
    write(rel / "code_reasoning" / "0020.txt", f"Does it print 3?{q}\tYes\nDoes it print 4?{q}\tNo\n")
    return rel


def test_mme_reads_both_layouts_and_scores_acc_plus_per_image(tmp_path):
    mme_release(tmp_path)
    bench = get_benchmark("mme")
    samples = bench.load(tmp_path)   # the release folder is found below data_dir
    assert [s.id for s in samples] == [
        "existence/000.png/0", "existence/000.png/1", "existence/001.jpg/0", "existence/001.jpg/1",
        "artwork/10002.jpg/0", "artwork/10002.jpg/1", "code_reasoning/0020.png/0", "code_reasoning/0020.png/1"]
    assert samples[0].prompt == "Is there a dog in this image?" + SHORT
    assert load_images(samples[4])[0].size == (4, 3)
    assert_clean_prompts(samples)
    predictions = {
        "existence/000.png/0": "Yes", "existence/000.png/1": "No, there is no cat.",   # image right twice
        "existence/001.jpg/0": "No", "existence/001.jpg/1": "I think no",              # "other": wrong
        "artwork/10002.jpg/0": "yes", "artwork/10002.jpg/1": "Not really",
        "code_reasoning/0020.png/0": "Yes.",                                            # second one missing
    }
    m = bench.score(samples, predictions)
    # existence: acc 3/4 = 75, acc+ 1/2 = 50 -> 125; artwork 100 + 100; code_reasoning 50 + 0
    assert m["categories"]["existence"] == pytest.approx({"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "images": 2})
    assert m["categories"]["artwork"]["score"] == pytest.approx(200.0)
    assert m["categories"]["code_reasoning"]["score"] == pytest.approx(50.0)
    assert m["perception"] == pytest.approx(325.0) and m["cognition"] == pytest.approx(50.0)
    assert m["missing_predictions"] == 1 and "count" in m["missing_categories"]


def test_mme_limit_keeps_question_pairs_whole(tmp_path):
    mme_release(tmp_path)
    assert len(get_benchmark("mme").load(tmp_path, limit=3)) == 2
    assert len(get_benchmark("mme").load(tmp_path, limit=1)) == 2   # at least one image


def test_mme_malformed_line_names_file_and_line(tmp_path):
    rel = mme_release(tmp_path)
    write(rel / "artwork" / "questions_answers_YN" / "10002.txt", "Is it Baroque?\tYes\nIs it Gothic? No\n")
    with pytest.raises(MatvlmError, match=r"10002\.txt: line 2 .*question<TAB>Yes\|No") as err:
        get_benchmark("mme").load(tmp_path)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ POPE


def pope_data(root):
    labels = ["yes", "yes", "no", "no"]
    for split in ("random", "popular"):   # no adversarial file: the splits found are scored
        jsonl(root / "coco" / f"coco_pope_{split}.json", [
            {"question_id": i + 1, "image": f"COCO_val2014_{i:012d}.jpg", "text": f"Is there a thing {i}?", "label": lab}
            for i, lab in enumerate(labels)])
    for i in range(4):
        png(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


def test_pope_metrics_per_split_with_yes_as_positive(tmp_path):
    bench = get_benchmark("pope")
    samples = bench.load(pope_data(tmp_path))
    assert len(samples) == 8 and samples[0].id == "random/1" and samples[4].id == "popular/1"
    assert samples[0].prompt == "Is there a thing 0?" + SHORT
    preds = {  # random: TP 1, FN 1, FP 1, TN 1;  popular: TP 2, FP 1, TN 1, FN 0
        "random/1": "Yes", "random/2": "No, there is not.", "random/3": "Yes.", "random/4": "No",
        "popular/1": "Yes", "popular/2": "There is a cup. No other.", "popular/3": "I see one", "popular/4": "no",
    }
    m = bench.score(samples, preds)
    rnd, pop = m["splits"]["random"], m["splits"]["popular"]
    assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == pytest.approx((50,) * 5)
    assert pop["accuracy"] == pytest.approx(75) and pop["precision"] == pytest.approx(200 / 3)
    assert pop["recall"] == pytest.approx(100) and pop["f1"] == pytest.approx(80) and pop["yes_ratio"] == pytest.approx(75)
    assert m["f1"] == pytest.approx(65) and m["accuracy"] == pytest.approx(62.5)
    assert len(bench.load(tmp_path, limit=2)) == 2 and {s.meta["split"] for s in bench.load(tmp_path, limit=2)} == {
        "random", "popular"}


def test_pope_bad_label_and_missing_files(tmp_path):
    jsonl(tmp_path / "coco_pope_random.json", [{"question_id": 1, "image": "x.jpg", "text": "?", "label": "maybe"}])
    with pytest.raises(MatvlmError, match=r"coco_pope_random\.json: line 1 has label 'maybe'"):
        get_benchmark("pope").load(tmp_path)
    with pytest.raises(MatvlmError, match=r"coco_pope_random\.json: no POPE split file found; expected layout"):
        get_benchmark("pope").load(tmp_path / "empty")


# ------------------------------------------------------------------------------------ ScienceQA


def sqa_data(root):
    problems = {
        "1": {"question": "Which animal is shown?", "choices": ["cat", "dog", "bird"], "answer": 1,
              "hint": "A pet photo.", "image": "image.png", "subject": "natural science"},
        "2": {"question": "What is the weather?", "choices": ["sunny", "rainy"], "answer": 0, "hint": "",
              "image": "image.png"},
        "3": {"question": "Text only?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None},
        "4": {"question": "Train?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"},
    }
    write(root / "problems.json", json.dumps(problems))
    write(root / "pid_splits.json", json.dumps({"test": ["1", "2", "3"], "train": ["4"]}))
    png(root / "images" / "test" / "1" / "image.png")
    png(root / "images" / "test" / "2" / "image.png")
    return root


def test_scienceqa_img_subset_prompt_and_letter_scoring(tmp_path):
    bench = get_benchmark("sqa-img")
    samples = bench.load(sqa_data(tmp_path))
    assert [s.id for s in samples] == ["1", "2"]   # test split, with an image
    assert samples[0].prompt == "Context: A pet photo.\nWhich animal is shown?\nA. cat\nB. dog\nC. bird" + LETTER
    assert samples[1].prompt == "What is the weather?\nA. sunny\nB. rainy" + LETTER
    assert bench.score(samples, {"1": "B. dog", "2": "a"})["accuracy"] == pytest.approx(50)
    assert bench.score(samples, {"1": "D", "2": "The answer is A."})["accuracy"] == pytest.approx(50)
    assert bench.score(samples, {"1": "B", "2": "A"})["accuracy"] == pytest.approx(100)


def test_scienceqa_malformed_json_and_bad_answer_index(tmp_path):
    sqa_data(tmp_path)
    write(tmp_path / "problems.json", "{not json")
    with pytest.raises(MatvlmError, match=r"problems\.json: not valid JSON .*expected layout: <data_dir>/problems\.json"):
        get_benchmark("sqa-img").load(tmp_path)
    write(tmp_path / "problems.json", json.dumps({"1": {"question": "q", "choices": ["a"], "answer": 3, "image": "i.png"}}))
    write(tmp_path / "pid_splits.json", json.dumps({"test": ["1"]}))
    with pytest.raises(MatvlmError, match=r"problem 1: answer 3 does not index its 1 choices"):
        get_benchmark("sqa-img").load(tmp_path)


# -------------------------------------------------------------------------------------- TextVQA


def textvqa_data(root, ocr=True):
    data = [
        {"question_id": 34602, "question": "how many cups?", "image_id": "img1", "answers": ["two", "2"] + ["3"] * 8},
        {"question_id": 34603, "question": "what brand is it?", "image_id": "img2",
         "answers": ["the coca cola"] * 3 + ["coke"] * 7},
    ]
    write(root / "TextVQA_0.5.1_val.json", json.dumps({"dataset_name": "textvqa", "data": data}))
    if ocr:
        write(root / "TextVQA_Rosetta_OCR_v0.2_val.json", json.dumps(
            {"data": [{"image_id": "img1", "ocr_tokens": ["dakota", "digital"]}, {"image_id": "img2", "ocr_tokens": []}]}))
    png(root / "train_images" / "img1.jpg")
    png(root / "train_images" / "img2.jpg")
    return root


def test_textvqa_ocr_prompt_and_soft_accuracy(tmp_path):
    samples = get_benchmark("textvqa").load(textvqa_data(tmp_path))
    assert samples[0].prompt == "how many cups?\nReference OCR token: dakota, digital" + SHORT
    assert samples[1].prompt == "what brand is it?" + SHORT   # no tokens for this image: no OCR line
    m = get_benchmark("textvqa").score(samples, {"34602": "Two.", "34603": "Coca-Cola"})
    assert m["accuracy"] == pytest.approx((0.6 + 0.9) / 2 * 100) and m["ocr_tokens"] is True
    plain = get_benchmark("textvqa", ocr=False)
    samples = plain.load(tmp_path)
    assert "OCR" not in samples[0].prompt and plain.score(samples, {})["ocr_tokens"] is False


def test_textvqa_requires_ocr_file_when_asked_and_images(tmp_path):
    textvqa_data(tmp_path, ocr=False)
    assert "OCR" not in get_benchmark("textvqa").load(tmp_path)[0].prompt   # auto: none available
    with pytest.raises(MatvlmError, match=r"TextVQA_Rosetta_OCR_v0\.2_val\.json: no such file"):
        get_benchmark("textvqa", ocr=True).load(tmp_path)
    (tmp_path / "train_images" / "img2.jpg").unlink()
    with pytest.raises(MatvlmError, match=r"img2\.jpg: image file missing"):
        get_benchmark("textvqa").load(tmp_path)


# ---------------------------------------------------------------------------------------- VQAv2


def vqav2_data(root, annotations=True):
    qs = [{"question_id": 4201, "image_id": 42, "question": "How many dogs?"},
          {"question_id": 701, "image_id": 7, "question": "Is it sunny?"},
          {"question_id": 702, "image_id": 7, "question": "What animal?"}]
    write(root / "v2_OpenEnded_mscoco_val2014_questions.json", json.dumps({"data_subtype": "val2014", "questions": qs}))
    if annotations:
        ann = lambda qid, answers, kind: {"question_id": qid, "answer_type": kind,  # noqa: E731
                                          "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
        write(root / "v2_mscoco_val2014_annotations.json", json.dumps({"annotations": [
            ann(4201, ["2", "2", "2", "two"] + ["3"] * 6, "number"), ann(701, ["yes"] * 10, "yes/no"),
            ann(702, ["dog"] * 10, "other")]}))
    png(root / "val2014" / "COCO_val2014_000000000042.jpg")
    png(root / "val2014" / "COCO_val2014_000000000007.jpg")
    return root


def test_vqav2_soft_accuracy_per_answer_type(tmp_path):
    bench = get_benchmark("vqav2")
    samples = bench.load(vqav2_data(tmp_path))
    assert samples[0].id == "4201" and samples[0].prompt == "How many dogs?" + SHORT
    m = bench.score(samples, {"4201": "Two", "701": "Yes.", "702": "dogs"})
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["answer_types"] == pytest.approx({"number": 100.0, "other": 0.0, "yes/no": 100.0})


def test_vqav2_without_annotations_loads_but_does_not_score(tmp_path):
    samples = get_benchmark("vqav2").load(vqav2_data(tmp_path, annotations=False))
    assert len(samples) == 3
    with pytest.raises(MatvlmError, match="EvalAI"):
        get_benchmark("vqav2").score(samples, {})
    with pytest.raises(MatvlmError, match=r"v2_OpenEnded_mscoco_test-dev2015_questions\.json: no such file"):
        get_benchmark("vqav2", split="test-dev2015").load(tmp_path)


# ------------------------------------------------------------------------------------------ GQA


def test_gqa_exact_match_after_llava_normalisation(tmp_path):
    questions = {"201": {"question": "Is the sky blue?", "imageId": "n1", "answer": "yes"},
                 "202": {"question": "What is on the desk?", "imageId": "n2", "answer": "laptop"},
                 "203": {"question": "Which side is the cup on?", "imageId": "n1", "answer": "left"}}
    write(tmp_path / "testdev_balanced_questions.json", json.dumps(questions))
    png(tmp_path / "images" / "n1.jpg")
    png(tmp_path / "images" / "n2.jpg")
    samples = get_benchmark("gqa").load(tmp_path)
    assert samples[1].prompt == "What is on the desk?" + SHORT
    # "The laptop" keeps its article under GQA's exact match
    m = get_benchmark("gqa").score(samples, {"201": "Yes.", "202": "The laptop", "203": "Left"})
    assert m["accuracy"] == pytest.approx(200 / 3)
    write(tmp_path / "testdev_balanced_questions.json", json.dumps([questions["201"]]))
    with pytest.raises(MatvlmError, match=r"testdev_balanced_questions\.json: the top level is list, not dict"):
        get_benchmark("gqa").load(tmp_path)


# -------------------------------------------------------------------------------------- MMBench


def mmbench_tsv(path, rows):
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    lines = ["\t".join(cols)] + ["\t".join(str(r.get(c, "")) for c in cols) for r in rows]
    return write(path, "\n".join(lines) + "\n")


def test_mmbench_circular_eval_over_generated_rotations(tmp_path):
    b64 = base64.b64encode(png()).decode()
    mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", [
        {"index": 0, "question": "What animal is this?", "hint": "nan", "A": "cat", "B": "dog", "C": "bird",
         "answer": "B", "category": "animals", "image": b64},
        {"index": 1, "question": "Which color?", "hint": "Look at the car.", "A": "red", "B": "blue",
         "answer": "A", "category": "colors", "image": "0"},   # shares row 0's image
    ])
    bench = get_benchmark("mmbench")
    samples = bench.load(tmp_path)
    by_id = {s.id: s for s in samples}
    assert list(by_id) == ["0", "1000000", "2000000", "1", "1000001"]
    assert by_id["1000000"].meta["options"] == {"A": "dog", "B": "bird", "C": "cat"}
    assert by_id["1000000"].meta["answer"] == "A" and by_id["2000000"].meta["answer"] == "C"
    assert by_id["1"].prompt == "Look at the car.\nWhich color?\nA. red\nB. blue" + LETTER
    assert by_id["0"].prompt == "What animal is this?\nA. cat\nB. dog\nC. bird" + LETTER
    assert load_images(by_id["1"])[0].size == (4, 3)
    preds = {"0": "B", "1000000": "A. dog", "2000000": "The answer is C",   # right in every rotation
             "1": "A", "1000001": "A"}                                        # wrong once
    m = bench.score(samples, preds)
    assert m["accuracy"] == pytest.approx(50) and m["vanilla_accuracy"] == pytest.approx(100)
    assert m["categories"] == pytest.approx({"animals": 100.0, "colors": 0.0}) and m["questions"] == 2
    assert len(bench.load(tmp_path, limit=4)) == 3   # whole rotation groups only


def test_mmbench_uses_the_rotated_copies_a_tsv_carries(tmp_path):
    b64 = base64.b64encode(png()).decode()
    mmbench_tsv(tmp_path / "dev.tsv", [
        {"index": 5, "question": "Q?", "A": "x", "B": "y", "answer": "A", "category": "c", "image": b64},
        {"index": 1000005, "question": "Q?", "A": "y", "B": "x", "answer": "B", "category": "c", "image": "5"},
    ])
    samples = get_benchmark("mmbench").load(tmp_path)   # the only .tsv in the folder
    assert [s.id for s in samples] == ["5", "1000005"]
    assert get_benchmark("mmbench").score(samples, {"5": "A", "1000005": "(B) x"})["accuracy"] == pytest.approx(100)
    assert get_benchmark("mmbench").score(samples, {"5": "A", "1000005": "A"})["accuracy"] == 0


def test_mmbench_answer_outside_options_is_refused(tmp_path):
    mmbench_tsv(tmp_path / "mmbench_dev_20230712.tsv", [
        {"index": 0, "question": "Q?", "A": "x", "B": "y", "answer": "E", "image": base64.b64encode(png()).decode()}])
    with pytest.raises(MatvlmError, match=r"mmbench_dev_20230712\.tsv: line 2: answer 'E' is not one of the options"):
        get_benchmark("mmbench").load(tmp_path)


# ----------------------------------------------------------------------------------------- MMMU


def mmmu_row(sid, question, options, answer, kind="multiple-choice", images=1):
    row = {"id": sid, "question": question, "options": repr(options), "answer": answer, "question_type": kind}
    for n in range(1, 8):
        row[f"image_{n}"] = {"bytes": png(color=(n, n, n)), "path": f"{n}.png"} if n <= images else None
    return row


def test_mmmu_parquet_prompts_images_and_per_subject_accuracy(tmp_path):
    import pandas as pd

    (tmp_path / "Math").mkdir()
    (tmp_path / "Art").mkdir()
    pd.DataFrame([mmmu_row("validation_Math_1", "What is x in <image 1>?", [], "3.14", kind="open")]).to_parquet(
        tmp_path / "Math" / "validation-00000-of-00001.parquet")
    pd.DataFrame([
        mmmu_row("validation_Art_2", "<image 1> Who painted it?", ["Monet", "Picasso"], "A"),
        mmmu_row("validation_Art_1", "Which style are <image 1> and <image 2>?", ["Baroque", "Cubism", "Gothic"],
                 "B", images=2),
    ]).to_parquet(tmp_path / "Art" / "validation-00000-of-00001.parquet")
    bench = get_benchmark("mmmu")
    samples = bench.load(tmp_path)
    assert [s.id for s in samples] == ["validation_Art_1", "validation_Art_2", "validation_Math_1"]
    assert samples[1].prompt == "<image 1> Who painted it?\n(A) Monet\n(B) Picasso\n" + LETTER
    assert samples[2].prompt == "What is x in <image 1>?" + SHORT
    assert [im.getpixel((0, 0)) for im in load_images(samples[0])] == [(1, 1, 1), (2, 2, 2)]
    assert len(get_benchmark("mmmu", images="first").load(tmp_path)[0].images) == 1
    preds = {"validation_Art_1": "(B) Cubism",
             "validation_Art_2": "The painter of this artwork is Picasso",   # option text -> B, wrong
             "validation_Math_1": "x is approximately 3.14159"}
    m = bench.score(samples, preds)
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert m["subjects"] == {"Art": {"accuracy": pytest.approx(50.0), "n": 2}, "Math": {"accuracy": 100.0, "n": 1}}
    assert m["disciplines"]["Art and Design"]["accuracy"] == pytest.approx(50)


def test_mmmu_json_export_and_bad_options(tmp_path):
    png(tmp_path / "images" / "a.png")
    rec = {"id": "validation_Physics_3", "question": "Speed in <image 1>?", "options": ["1 m/s", "2 m/s"],
           "answer": "B", "question_type": "multiple-choice", "image_1": "images/a.png"}
    write(tmp_path / "mmmu_val.json", json.dumps([rec]))
    samples = get_benchmark("mmmu").load(tmp_path)
    assert load_images(samples[0])[0].size == (4, 3)
    assert get_benchmark("mmmu").score(samples, {"validation_Physics_3": "B"})["accuracy"] == 100
    write(tmp_path / "mmmu_val.json", json.dumps([{**rec, "options": "[1 m/s"}]))
    with pytest.raises(MatvlmError, match=r"mmmu_val\.json: record validation_Physics_3: options .* not a list literal"):
        get_benchmark("mmmu").load(tmp_path)


# --------------------------------------------------------------------------------------- MM-Vet


def mmvet_data(root):
    entries = {"v1_0": {"imagename": "v1_0.png", "question": "What is x?", "answer": "5 <OR> five",
                        "capability": ["ocr", "math"]},
               "v1_1": {"imagename": "v1_1.jpg", "question": "Name both animals.", "answer": "cat <AND> dog",
                        "capability": ["rec"]},
               "v1_2": {"imagename": "v1_0.png", "question": "Which year?", "answer": "2004", "capability": ["ocr"]}}
    write(root / "mm-vet.json", json.dumps(entries))
    png(root / "images" / "v1_0.png")
    png(root / "images" / "v1_1.jpg")
    return root


def test_mmvet_heuristic_judge_is_labelled_not_comparable(tmp_path):
    bench = get_benchmark("mmvet")
    samples = bench.load(mmvet_data(tmp_path))
    assert samples[0].prompt == "What is x?"   # MM-Vet prompts have no suffix
    m = bench.score(samples, {"v1_0": "x is five.", "v1_1": "I see a cat.", "v1_2": "In 2004."})
    assert m["score"] == pytest.approx(200 / 3) and m["comparable_to_published"] is False
    assert m["capabilities"] == pytest.approx({"math": 100.0, "ocr": 100.0, "rec": 0.0})
    judged = get_benchmark("mmvet", judge=lambda q, a, p: 0.5).score(samples, {})
    assert judged["score"] == pytest.approx(50) and judged["comparable_to_published"] is False


def test_mmvet_entry_without_answer(tmp_path):
    write(tmp_path / "mm-vet.json", json.dumps({"v1_0": {"imagename": "x.png", "question": "q", "capability": []}}))
    with pytest.raises(MatvlmError, match=r"mm-vet\.json: entry v1_0 has no field 'answer'"):
        get_benchmark("mmvet").load(tmp_path)


# ------------------------------------------------------------------------------------- registry


def test_registry_names_and_unknown_name():
    assert list(BENCHMARKS) == ["mme", "pope", "sqa-img", "textvqa", "gqa", "vqav2", "mmbench", "mmmu", "mmvet",
                               "shapes"]
    with pytest.raises(MatvlmError, match="unknown benchmark 'mmstar'; valid names: mme, pope, sqa-img"):
        get_benchmark("mmstar")
    with pytest.raises(MatvlmError, match="has no option ocr"):
        get_benchmark("gqa", ocr=True)


@pytest.mark.parametrize("name,missing", [
    ("mme", "no such directory"), ("pope", "coco_pope_random.json"), ("sqa-img", "problems.json"),
    ("textvqa", "TextVQA_0.5.1_val.json"), ("gqa", "testdev_balanced_questions.json"),
    ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json"), ("mmbench", "mmbench_dev_20230712.tsv"),
    ("mmmu", "no such directory"), ("mmvet", "mm-vet.json"),
])
def test_missing_data_is_one_line_naming_file_and_layout(tmp_path, name, missing):
    with pytest.raises(MatvlmError) as err:
        get_benchmark(name).load(tmp_path / "absent")
    message = str(err.value)
    assert missing in message and "expected layout:" in message and "\n" not in message
