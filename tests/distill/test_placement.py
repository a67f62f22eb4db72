"""--placement auto: per-layer sensitivity scores, the choice they make, and the convert / distill commands."""

import json
from pathlib import Path

import pytest
import torch

import matvlm
from matvlm.cli import main
from matvlm.convert import convert
from matvlm.convert.formats import load, load_processor
from matvlm.distill.config import DistillConfig
from matvlm.distill.placement import choose, layer_scores
from matvlm.distill.train import make_dataset

TEXTS = ["the cat sat on the mat and looked at the door", "a quick brown fox jumps over the lazy dog again",
         "numbers one two three four five six seven eight", "rain falls on the hills and the rivers run to the sea",
         "she opened the letter and read it twice before she spoke", "the train left the station at noon"]


@pytest.fixture
def text_data(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 3))
    return path


def test_choose_takes_the_lowest_scores_in_layer_order():
    assert choose([0.5, 0.1, 0.9, 0.2, 0.3, 0.8, 0.05, 0.4], 0.5) == [1, 3, 4, 6]
    assert choose([0.2, 0.2, 0.1, 0.3], 0.25) == [2]


def test_choose_with_a_gap_is_the_lowest_sum_of_layers_that_far_apart():
    import itertools
    import random

    from matvlm.convert.layers import count_for_ratio
    from matvlm.errors import MatvlmError

    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(4, 13)
        scores = [round(rng.random(), 2) for _ in range(n)]
        ratio, gap = rng.choice([0.25, 0.34, 0.5]), rng.randrange(1, 4)
        m = count_for_ratio(n, ratio)
        feasible = [c for c in itertools.combinations(range(n), m) if all(b - a >= gap for a, b in zip(c, c[1:]))]
        if not feasible:
            with pytest.raises(MatvlmError, match="do not fit"):
                choose(scores, ratio, gap)
            continue
        got = choose(scores, ratio, gap)
        assert len(got) == m and all(b - a >= gap for a, b in zip(got, got[1:]))
        assert abs(sum(scores[i] for i in got) - min(sum(scores[i] for i in c) for c in feasible)) < 1e-9
    # the 25 % SmolLM2 case: the plain lowest scores cluster at the end, a gap of 3 spreads them
    late = [0.3, 0.15, 0.05, 0.05, 0.04] + [0.03] * 15 + [0.06, 0.02, 0.02, 0.07, 0.04] + [0.02] * 5
    assert sum(i >= 21 for i in choose(late, 0.25)) >= 6
    spread = choose(late, 0.25, 3)
    assert all(b - a >= 3 for a, b in zip(spread, spread[1:])) and 0 not in spread and 1 not in spread


def test_a_layer_whose_mixer_is_broken_scores_worst_and_each_score_is_its_swap_alone(teacher_dirs, text_data,
                                                                                      tmp_path):
    d = teacher_dirs["causal-llama"]
    aligned_dir = convert(d, tmp_path / "all", mamba_ratio=1.0)                 # every layer a mixer
    aligned = load(aligned_dir, dtype=torch.float64)
    with torch.no_grad():
        aligned.mamba_mixers[2].out_proj.weight.mul_(50.0)                     # sabotage layer 2
    teacher = load(d, dtype=torch.float64)
    proc = load_processor(d)
    cfg = DistillConfig(teacher=str(d), data=str(text_data), out=str(tmp_path / "x"), max_length=64)
    ds = make_dataset(cfg, proc, teacher.config)
    scores, tokens = layer_scores(teacher, aligned, ds, proc.pad_token_id, list(range(6)), batch_size=4)
    assert tokens > 0 and max(range(len(scores)), key=scores.__getitem__) == 2
    assert teacher.hybrid_config.mamba_layers == [] and not teacher.mamba_mixers      # the teacher is restored
    # layer 0's score is the KL of the hybrid with only layer 0 replaced by that mixer
    one = load(convert(d, tmp_path / "one", mamba_layers=[0]), dtype=torch.float64)
    one.mamba_mixers[0].load_state_dict(aligned.mamba_mixers[0].state_dict())
    from matvlm.inputs.data import collate

    b = collate([ds[i] for i in range(6)], proc.pad_token_id)
    mask = b["attention_mask"].bool()
    with torch.no_grad():
        t = torch.log_softmax(load(d, dtype=torch.float64)(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)[mask]
        s = torch.log_softmax(one(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, -1)[mask]
    assert abs(float((t.exp() * (t - s)).sum(-1).mean()) - scores[0]) < 1e-9


@pytest.mark.parametrize("gap", [1, 2])
def test_convert_placement_auto_writes_the_chosen_layers_and_their_scores(teacher_dirs, text_data, tmp_path, capsys,
                                                                          gap):
    d = teacher_dirs["causal-llama"]
    out = tmp_path / "auto"
    assert main(["convert", str(d), str(out), "--placement", "auto", "--mamba-ratio", "0.5", "--data", str(text_data),
                 "--placement-steps", "3", "--placement-gap", str(gap)]) == 0
    report = json.loads((out / "placement.json").read_text())
    cfg = matvlm.load(out).hybrid_config
    assert cfg.mamba_layers == report["layers"] == choose(report["scores"], 0.5, gap) and report["gap"] == gap
    assert min(b - a for a, b in zip(cfg.mamba_layers, cfg.mamba_layers[1:])) >= gap
    assert len(report["scores"]) == cfg.n_layer and cfg.source["placement"] == "auto"
    assert not list(tmp_path.glob(".auto.placement*"))                          # its work directory is gone
    assert main(["convert", str(d), str(tmp_path / "x"), "--placement", "auto"]) == 2
    assert "--placement auto takes --data" in capsys.readouterr().err


def test_distill_placement_auto_trains_the_measured_student(teacher_dirs, text_data, tmp_path):
    d = teacher_dirs["causal-llama"]
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(d), "--data", str(text_data), "--out", str(out), "--mamba-ratio", "0.5",
                 "--placement", "auto", "--placement-gap", "2", "--placement-steps", "2", "--max-steps", "2",
                 "--global-batch-size", "4", "--micro-batch-size", "2", "--no-tensorboard"]) == 0
    report = json.loads((out / "placement.json").read_text())
    assert matvlm.load(out).hybrid_config.mamba_layers == report["layers"] == choose(report["scores"], 0.5, 2)
    stored = json.loads((out / "distill_config.json").read_text())
    assert stored["student"] == str(out / "placement" / "student-init") and stored["placement"] == "auto"


def test_a_placement_gap_goes_with_auto_placement_only():
    from matvlm.commands import convert
    from matvlm.distill.config import DistillConfig
    from matvlm.errors import MatvlmError

    with pytest.raises(MatvlmError, match="--placement-gap goes with --placement auto"):
        DistillConfig(teacher="t", data="d", out="o", mamba_ratio=0.25, placement="even", placement_gap=3).validate()
    with pytest.raises(MatvlmError, match="--placement-gap must be >= 1"):
        DistillConfig(teacher="t", data="d", out="o", mamba_ratio=0.25, placement="auto", placement_gap=0).validate()
    with pytest.raises(MatvlmError, match="--placement-gap goes with --placement auto"):
        convert(Path("t"), Path("o"), placement="even", placement_gap=2)
