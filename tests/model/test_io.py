"""Hybrid checkpoints: exact round trip, self-describing layout, clear errors, atomic writes."""

import json

import pytest
import torch
from safetensors import safe_open

import matvlm
from matvlm.convert import convert
from matvlm.errors import MatvlmError
from matvlm.model import io, save


@pytest.fixture(scope="module")
def hybrid_dir(teacher_dirs, tmp_path_factory):
    return convert(teacher_dirs["phi"], tmp_path_factory.mktemp("io") / "h", mamba_ratio=0.5)


def all_keys(path):
    keys = {}
    for f in io.weight_files(path):
        with safe_open(str(f), "pt") as fh:
            keys.update({k: f for k in fh.keys()})
    return keys


def test_save_load_round_trip_is_bit_exact(hybrid_dir, tmp_path):
    a = matvlm.load(hybrid_dir)
    a.save_pretrained(tmp_path / "again")
    b = matvlm.load(tmp_path / "again")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert b.hybrid_config == a.hybrid_config


def test_sharded_round_trip(hybrid_dir, tmp_path):
    a = matvlm.load(hybrid_dir)
    tensors = io.checkpoint_state_dict(a)
    out = tmp_path / "sharded"
    out.mkdir()
    io.write_safetensors(tensors, out, max_shard_bytes=200_000)
    assert (out / io.INDEX).is_file() and len(io.weight_files(out)) > 1
    back = io.read_tensors(io.weight_files(out))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_layout_is_matvlm_compatible(hybrid_dir):
    cfg = json.loads((hybrid_dir / "mamba_config.json").read_text())
    assert cfg["attn_layers"] == [1, 3] and cfg["mamba_layers"] == [0, 2] and cfg["n_layer"] == 4
    assert cfg["d_xb"] == cfg["d_inner"] == 64 and cfg["ssm_cfg"]["ngroups"] == 4 and cfg["ssm_cfg"]["d_state"] == 16
    keys = all_keys(hybrid_dir)
    for i in (0, 2):
        for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                     "out_proj.weight"):
            assert f"model.language_model.layers.{i}.mamba.{name}" in keys
        assert not any(k.startswith(f"model.language_model.layers.{i}.self_attn.") for k in keys)
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in keys
    config = json.loads((hybrid_dir / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    for f in ("tokenizer.json", "processor_config.json"):
        assert (hybrid_dir / f).is_file()


def test_a_failed_save_leaves_nothing_behind(hybrid_dir, tmp_path, monkeypatch):
    model = matvlm.load(hybrid_dir)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(save, "write_safetensors", boom)            # where save_hybrid writes the weights
    with pytest.raises(OSError):
        io.save_hybrid(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def copy_dir(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_safetensors_is_a_clear_error(hybrid_dir, tmp_path):
    bad = copy_dir(hybrid_dir, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
    with pytest.raises(MatvlmError, match="corrupt or unreadable weight file .*model.safetensors"):
        matvlm.load(bad)


def test_missing_tensor_is_named(hybrid_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = copy_dir(hybrid_dir, tmp_path / "bad")
    t = load_file(str(bad / "model.safetensors"))
    del t["model.language_model.layers.2.mamba.A_log"]
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(MatvlmError, match=r"missing 1 tensors .*layers\.2\.mamba\.A_log"):
        matvlm.load(bad)


def test_pickle_only_checkpoints_are_refused(hybrid_dir, tmp_path):
    bad = copy_dir(hybrid_dir, tmp_path / "bad")
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(MatvlmError, match="safetensors only"):
        matvlm.load(bad)
