"""End to end: the shipped toy teacher and its student scored by the same path; resume; score-only; compare."""

import json

import pytest

import matvlm
from matvlm.cli import main
from matvlm.convert import convert
from matvlm.eval.benchmarks import read_predictions
from matvlm.toy import shapes
from matvlm.toy.demo import ASSET


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes-eval")
    shapes.write_dataset(root, 4, seed=123, split="test", questions_per_image=6)
    return root


def test_teacher_and_student_through_the_same_command(fixture, tmp_path, capsys):
    student = convert(ASSET, tmp_path / "student", mamba_ratio=0.25)
    for name, model in (("teacher", ASSET), ("student", student)):
        rc = main(["eval", str(model), "--benchmark", "shapes", "--data", str(fixture), "--output",
                   str(tmp_path / f"{name}.json"), "--device", "cpu"])
        assert rc == 0
    teacher = json.loads((tmp_path / "teacher.json").read_text())
    assert teacher["benchmark"] == "shapes" and teacher["n"] == 24
    assert teacher["metrics"]["accuracy"] >= 90.0                     # the shipped teacher: 99.6 % held-out
    answers = read_predictions(tmp_path / "teacher.shapes.answers.jsonl")
    assert len(answers) == 24
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "teacher.json"), str(tmp_path / "student.json")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student" in out and "Shapes" in out


def test_rerun_skips_answered_and_scores_without_a_model(fixture, tmp_path, monkeypatch):
    from matvlm.engine.engine import Engine

    answers = tmp_path / "a.jsonl"
    assert main(["eval", str(ASSET), "--benchmark", "shapes", "--data", str(fixture), "--predictions", str(answers),
                 "--limit", "6", "--device", "cpu"]) == 0
    calls = []
    real = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, reqs: calls.append(len(reqs)) or real(self, reqs))
    assert main(["eval", str(ASSET), "--benchmark", "shapes", "--data", str(fixture), "--predictions", str(answers),
                 "--limit", "12", "--device", "cpu"]) == 0
    assert sum(calls) == 6                                           # only the 6 new questions were generated
    assert main(["eval", "--benchmark", "shapes", "--data", str(fixture), "--predictions", str(answers),
                 "--limit", "12", "--output", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 12


def test_eval_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--benchmark", "nope", "--data", str(tmp_path)]) == 2
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "shapes", "--data", str(tmp_path), "--predictions", str(tmp_path / "x")]) == 2
    assert "test.json" in capsys.readouterr().err


def test_eval_prepares_images_as_the_checkpoint_says(fixture, tmp_path, monkeypatch):
    """A checkpoint trained with padded images (TinyLLaVA, MaTVLM: image_aspect_ratio "pad") is
    evaluated with padded images, as their own evaluation does."""
    import shutil

    from matvlm.engine import engine as engine_mod

    model = tmp_path / "padded"
    shutil.copytree(ASSET, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["image_aspect_ratio"] = "pad"
    (model / "config.json").write_text(json.dumps(cfg))
    seen = []
    real_init = engine_mod.Engine.__init__

    def record(self, *a, **kw):
        seen.append(kw.get("image_aspect"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(engine_mod.Engine, "__init__", record)
    assert main(["eval", str(model), "--benchmark", "shapes", "--data", str(fixture), "--limit", "2",
                 "--output", str(tmp_path / "r.json"), "--device", "cpu"]) == 0
    assert seen == ["pad"]
