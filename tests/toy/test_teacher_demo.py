"""The shipped toy teacher, its recipe's encoding shortcut, and `matvlm demo`."""

import json

import torch

import matvlm
from matvlm.toy import shapes, teacher
from matvlm.toy.demo import ASSET, run


def test_shipped_teacher_reaches_its_documented_accuracy(tmp_path):
    documented = json.loads((ASSET / "training.json").read_text())["heldout"]["overall"]
    assert documented >= 0.95
    test = shapes.write_dataset(tmp_path, 16, seed=0, split="test", questions_per_image=6)   # the held-out split
    model, proc = matvlm.load(ASSET, dtype="float32"), matvlm.load_processor(ASSET)
    result = teacher.evaluate(model, proc, test, batch_size=96)
    assert result["n"] == 96 and result["overall"] >= 0.95, result


def test_batched_toy_encoding_equals_the_general_encoder(tmp_path):
    from matvlm.inputs.tokens import encode_segments
    from matvlm.inputs.templates import get_template

    path = shapes.write_dataset(tmp_path, 5, seed=3, split="train", questions_per_image=6)
    proc = matvlm.load_processor(ASSET)
    records = shapes.load_samples(path)
    t = get_template("plain", eos_token="<|endoftext|>")
    fast = teacher._encode_batched(records, t, proc, 64)
    for r, (ids, labels) in zip(records, fast):
        ref_ids, ref_labels = encode_segments(t.segments([(teacher.question_of(r), r["answer"])], has_image=True),
                                              proc, n_image_tokens=64)
        assert torch.equal(ids, ref_ids) and torch.equal(labels, ref_labels)


def test_demo_tiny_budget_end_to_end(tmp_path):
    lines = []
    summary = run(tmp_path, budget="tiny", seed=5, log=lines.append)
    student = matvlm.load(summary["student_dir"])
    assert student.hybrid_config.mamba_layers == [0, 4]                      # 25 % of 8 layers, even
    assert (tmp_path / "student" / "fresh.png").is_file() and (tmp_path / "demo.json").is_file()
    table = next(l for l in lines if "question type" in l)
    for row in ("color", "describe", "overall", "kept of teacher", "tokens/s", "cache at"):
        assert row in table
    assert summary["student"]["cache_bytes"] < summary["teacher"]["cache_bytes"]
    assert 0.0 <= summary["student"]["overall"] <= 1.0 and summary["teacher"]["n"] == 12
