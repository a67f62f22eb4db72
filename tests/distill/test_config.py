"""DistillConfig is the one source of `matvlm distill`'s settings flags and of recipe keys."""

import dataclasses

import pytest

from matvlm import commands
from matvlm.cli import _doc_parts, build_parser
from matvlm.distill.config import DistillConfig
from matvlm.errors import MatvlmError


def test_every_setting_has_a_documented_flag_with_its_type_choices_and_default():
    parser = build_parser(commands.distill, "matvlm distill")
    actions = {a.dest: a for a in parser._actions}
    _, helps = _doc_parts(DistillConfig, "Attributes")
    for f in dataclasses.fields(DistillConfig):
        assert f.name in helps and helps[f.name], f"DistillConfig.{f.name} has no help in its docstring"
        a = actions[f.name]
        assert a.default is None and helps[f.name].split()[0] in a.help       # unset flags leave the recipe's value
    assert actions["stage"].choices == ["e2e", "align", "both"]
    assert actions["placement"].choices == ["even", "begin", "middle", "end", "auto"]
    assert "(default: 0.9,0.95)" in actions["adam_betas"].help and "(default: 2e-4" not in actions["lr"].help
    ns = parser.parse_args(["--adam-betas", "0.8,0.99", "--train", "mamba,mlp", "--no-tensorboard", "--lr", "1e-3"])
    assert ns.adam_betas == [0.8, 0.99] and ns.train == ["mamba", "mlp"] and ns.tensorboard is False
    assert ns.lr == 1e-3 and ns.max_steps is None and ns.gradient_checkpointing is None
    given = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(DistillConfig)}}
    cfg = DistillConfig.from_sources(None, **{**given, "teacher": "t", "data": "d", "out": "o", "mamba_ratio": 0.5})
    assert cfg.adam_betas == (0.8, 0.99) and cfg.tensorboard is False and cfg.save_every == 500
    cfg.validate()


def test_flags_override_a_recipe_and_unset_flags_keep_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: t\ndata: d\nout: o\nmamba_ratio: 0.25\nlr: 0.003\nadam_betas: [0.9, 0.98]\n")
    ns = build_parser(commands.distill, "matvlm distill").parse_args(["--config", str(recipe), "--alpha", "0.01"])
    settings = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(DistillConfig)}}
    cfg = DistillConfig.from_sources(ns.config, **settings)
    assert (cfg.lr, cfg.adam_betas, cfg.alpha, cfg.beta) == (0.003, (0.9, 0.98), 0.01, 1.0)


@pytest.mark.parametrize("values,why", [({"adam_betas": (0.9,)}, "--adam-betas takes two values"),
                                        ({"placement": "sideways"}, "--placement must be one of"),
                                        ({"micro_batch_tokens": 0}, "--micro-batch-tokens must be >= 1"),
                                        ({"micro_batch_tokens": 4096, "loss_reduction": "sum"},
                                         "--micro-batch-tokens needs --loss-reduction mean")])
def test_bad_settings_are_refused_in_one_line(values, why):
    with pytest.raises(MatvlmError, match=why):
        DistillConfig(teacher="t", data="d", out="o", mamba_ratio=0.5, **values).validate()
    with pytest.raises(MatvlmError, match="unknown distill setting"):
        commands.distill(teacher="t", data="d", out="o", mamba_ratio=0.5, learning_rate=1.0)


def test_distill_placements_are_converts_and_auto():
    from matvlm.convert.layers import PLACEMENTS as POSITIONAL
    from matvlm.distill.config import PLACEMENTS

    assert PLACEMENTS == (*POSITIONAL, "auto")
