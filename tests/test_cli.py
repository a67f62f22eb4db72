"""The command line: help, the happy path, and one-line errors that leave nothing behind."""

import shutil
import subprocess
import sys

import pytest

from matvlm.cli import main


def run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_top_level_help_lists_commands(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "convert" in out and "toy tiny-teacher" in out


def test_convert_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ("--mamba-ratio", "--placement", "--mamba-layers", "--dtype", "--seed", "--overwrite"):
        assert flag in out
    assert "{even,begin,middle,end,auto}" in out


def test_convert_then_info(capsys, teacher_dirs, tmp_path):
    rc, out, _ = run(capsys, "convert", teacher_dirs["phi"], tmp_path / "h", "--mamba-layers", "1,3")
    assert rc == 0 and "2/4 Mamba-2 layers at [1, 3]" in out
    rc, out, _ = run(capsys, "info", tmp_path / "h")
    assert rc == 0 and "mamba layers:  [1, 3]" in out and "format:        matvlm" in out


def corrupt_teacher(teacher_dirs, tmp_path):
    bad = shutil.copytree(teacher_dirs["phi"], tmp_path / "corrupt")
    (bad / "model.safetensors").write_bytes(b"garbage" * 10)
    return bad


def unsupported(tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    return d


CASES = {
    "missing-path": (lambda t, p: [p / "nope", p / "out"], "no such file or directory"),
    "no-model-in-dir": (lambda t, p: [p, p / "out"], "has no config.json"),
    "unsupported-arch": (lambda t, p: [unsupported(p), p / "out"], "unsupported architecture (model_type 'gpt2')"),
    "ratio-too-big": (lambda t, p: [t["phi"], p / "out", "--mamba-ratio", "1.5"], r"must be in (0, 1], got 1.5"),
    "ratio-zero": (lambda t, p: [t["phi"], p / "out", "--mamba-ratio", "0"], r"must be in (0, 1], got 0.0"),
    "layer-out-of-range": (lambda t, p: [t["phi"], p / "out", "--mamba-layers", "0,4"], "[4] out of range"),
    "corrupt-safetensors": (lambda t, p: [corrupt_teacher(t, p), p / "out"], "model.safetensors"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_nonzero_and_leaves_nothing(capsys, teacher_dirs, tmp_path, case):
    make, expected = CASES[case]
    args = make(teacher_dirs, tmp_path)
    rc, _, err = run(capsys, "convert", *args)
    lines = [l for l in err.splitlines() if l.startswith("matvlm:")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("matvlm: error: ")
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_existing_output_is_not_overwritten_without_flag(capsys, teacher_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    rc, _, err = run(capsys, "convert", teacher_dirs["phi"], tmp_path / "out")
    assert rc == 2 and "already exists" in err


def test_console_script_exit_status(tmp_path):
    """The installed entry point (python -m matvlm) exits non-zero with the one-line error."""
    r = subprocess.run([sys.executable, "-m", "matvlm", "convert", str(tmp_path / "none"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("no such file or directory")


def test_toy_commands_take_out_as_a_required_flag(capsys, tmp_path):
    assert main(["toy", "data", "--out", str(tmp_path / "d"), "--n", "3", "--n-test", "2"]) == 0
    assert (tmp_path / "d" / "train.json").is_file() and (tmp_path / "d" / "test.json").is_file()
    with pytest.raises(SystemExit) as e:
        main(["toy", "data", "--n", "3"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_group_help_lists_its_subcommands(capsys):
    rc, out, _ = run(capsys, "toy", "--help")
    assert rc == 0
    for sub in ("tiny-teacher", "data", "train-teacher"):
        assert f"  {sub} " in out
    assert "Shapes-VQA" in out                      # with their summaries, not only a usage line


def _no_model_loading(monkeypatch):
    """Make any model load fail loudly: a check that needs it did not come first."""
    from matvlm.convert import formats

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the cheap inputs were checked")
    monkeypatch.setattr(formats, "load", refuse)


@pytest.mark.parametrize("case", ["missing-data", "bad-json", "missing-student"])
def test_distill_checks_its_inputs_before_loading_the_model(capsys, teacher_dirs, tmp_path, monkeypatch, case):
    _no_model_loading(monkeypatch)
    data = tmp_path / "train.json"
    data.write_text("[{\"id\": 1" if case == "bad-json" else "[]")
    args = ["distill", "--teacher", teacher_dirs["phi"], "--out", tmp_path / "run",
            "--data", tmp_path / "nope.json" if case == "missing-data" else data]
    args += ["--student", tmp_path / "no-student"] if case == "missing-student" else ["--mamba-ratio", "0.5"]
    rc, _, err = run(capsys, *args)
    expected = {"missing-data": "no such data file", "bad-json": "not valid JSON",
                "missing-student": "no such file or directory"}[case]
    assert rc == 2 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_eval_checks_benchmark_names_and_data_before_loading_the_model(capsys, teacher_dirs, tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    rc, _, err = run(capsys, "eval", teacher_dirs["phi"], "--benchmark", "popee", "--data", tmp_path)
    assert rc == 2 and "unknown benchmark 'popee'" in err
    rc, _, err = run(capsys, "eval", teacher_dirs["phi"], "--benchmark", "pope", "--data", tmp_path / "nope")
    assert rc == 2 and "matvlm: error:" in err and "pope" in err.lower()


def test_the_gpu_benchmarks_and_the_ablations_are_subcommands_and_say_what_they_need(capsys):
    for cmd in (["bench-kernels"], ["bench-distill-step"]):
        assert main(cmd) == 2                            # this CPU machine has no CUDA GPU
        err = capsys.readouterr().err.strip()
        assert err.startswith("matvlm: error:") and "CUDA" in err and "\n" not in err
    with pytest.raises(SystemExit):
        main(["toy", "ablations", "--help"])
    assert "--eval-images" in capsys.readouterr().out
