"""Every layout matvlm reads gives the same model: parity with transformers and TinyLLaVA key maps."""

import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

import matvlm
from matvlm.convert import convert
from matvlm.errors import MatvlmError


def vlm_batch(path, image):
    proc = matvlm.load_processor(path)
    proc.tokenizer.padding_side = "left"
    return proc(images=[image, image], text=["USER: <image>\nhi ASSISTANT:", "USER: <image>\nwhat is it? ASSISTANT:"],
                return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", ["phi", "llama", "qwen2"])
def test_teacher_dir_logits_equal_transformers(teacher_dirs, image, family):
    path = teacher_dirs[family]
    ref = LlavaForConditionalGeneration.from_pretrained(path).eval()
    ours = matvlm.load(path)
    assert ours.hybrid_config.mamba_layers == []
    batch = vlm_batch(path, image)
    with torch.no_grad():
        a, b = ref(**batch).logits, ours(**batch).logits
    assert (a - b).abs().max() < 1e-5


def test_causal_lm_dir_logits_equal_transformers(teacher_dirs):
    path = teacher_dirs["causal-llama"]
    tok = matvlm.load_processor(path)
    batch = tok(["the quick brown fox"], return_tensors="pt")
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(path).eval()(**batch).logits
        b = matvlm.load(path)(**batch).logits
    assert (a - b).abs().max() < 1e-5


def test_conversion_keeps_every_other_weight_bit_identical(teacher_dirs, tmp_path):
    teacher = matvlm.load(teacher_dirs["llama"])
    hybrid = matvlm.load(convert(teacher_dirs["llama"], tmp_path / "h", mamba_layers=[1, 3]))
    t, h = teacher.state_dict(), hybrid.state_dict()
    replaced = re.compile(r"language_model\.layers\.(1|3)\.self_attn\.")
    kept = [k for k in t if not replaced.search(k)]
    assert kept and all(torch.equal(t[k], h[k]) for k in kept)
    swapped = [k for k in h if replaced.search(k)]
    assert swapped and all(".self_attn.q_proj" not in k for k in swapped)
    assert any(k.endswith("self_attn.in_proj.weight") for k in swapped)


# --- TinyLLaVA and MaTVLM's released layout ----------------------------------------------------

def to_tinyllava_name(key, mamba_layers=()):
    """transformers llava-hf names -> TinyLLaVA_Factory names (per its modeling code)."""
    for i in mamba_layers:
        key = key.replace(f"model.language_model.layers.{i}.self_attn.", f"model.language_model.layers.{i}.mamba.")
    for old, new in [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                     ("model.vision_tower.", "vision_tower._vision_tower.vision_model."),
                     ("model.multi_modal_projector.linear_1.", "connector._connector.0."),
                     ("model.multi_modal_projector.linear_2.", "connector._connector.2.")]:
        if key.startswith(old):
            return new + key[len(old):]
    raise AssertionError(key)


def write_tinyllava(model, src_dir, out, mamba_layers=()):
    out.mkdir()
    text = model.config.text_config.to_dict()
    vision = model.config.vision_config.to_dict()
    config = {"model_type": "tinyllava", "architectures": ["TinyLlavaForConditionalGeneration"],
              "llm_model_name_or_path": "microsoft/phi-2", "connector_type": "mlp2x_gelu",
              "vision_feature_layer": -2, "vision_feature_select_strategy": "patch",
              "image_aspect_ratio": "pad", "text_config": text, "vision_config": vision}
    (out / "config.json").write_text(json.dumps(config))
    sd = {to_tinyllava_name(k, mamba_layers): v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(out / "model.safetensors"))
    tok = json.loads((src_dir / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<image>"]   # TinyLLaVA uses id -200
    (out / "tokenizer.json").write_text(json.dumps(tok))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    return out


def test_tinyllava_layout_logits_equal_the_llava_hf_model(teacher_dirs, image, tmp_path):
    ref = matvlm.load(teacher_dirs["phi"])
    tiny = write_tinyllava(ref, teacher_dirs["phi"], tmp_path / "tinyllava")
    assert matvlm.detect_format(tiny) == "tinyllava"
    ours = matvlm.load(tiny)
    assert ours.config.vision_feature_select_strategy == "default" and ours.config.image_aspect_ratio == "pad"
    batch = vlm_batch(tiny, image)
    assert (batch["input_ids"] == ours.config.image_token_id).sum() == 2 * 15      # 4x4 patches, first dropped
    with torch.no_grad():
        assert (ref(**batch).logits - ours(**batch).logits).abs().max() < 1e-5


def test_released_matvlm_layout_loads_with_its_own_lm_head(teacher_dirs, image, tmp_path):
    hybrid = matvlm.load(convert(teacher_dirs["phi"], tmp_path / "h", mamba_layers=[0, 2]))
    with torch.no_grad():
        hybrid.lm_head.weight.mul_(1.5)                     # a head that differs from the base LM's
    up = write_tinyllava(hybrid, teacher_dirs["phi"], tmp_path / "released", mamba_layers=[0, 2])
    cfg = hybrid.hybrid_config
    (up / "mamba_config.json").write_text(json.dumps({     # fields as MaTVLM's PhiMambaConfig writes them
        "d_model": cfg.d_model, "ssm_cfg": {"expand": 1, "ngroups": cfg.ngroups, "d_state": cfg.d_state},
        "layer_norm_eps": 1e-5, "vocab_size": None, "d_inner": cfg.d_inner, "d_xb": cfg.d_inner,
        "intermediate_size": 128, "hidden_act": "gelu_new", "n_layer": 4, "attn_layers": [1, 3],
        "resid_pdrop": 0.1, "bidirectional": False, "is_bias": True}))
    assert matvlm.detect_format(up) == "matvlm-upstream"
    ours = matvlm.load(up)
    assert ours.hybrid_config.mamba_layers == [0, 2]
    batch = vlm_batch(up, image)
    with torch.no_grad():
        assert (hybrid(**batch).logits - ours(**batch).logits).abs().max() < 1e-5


@pytest.mark.parametrize("make,match", [
    (lambda d: d / "nope", "no such file or directory"),
    (lambda d: d, "has no config.json: not a model directory"),
    (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}') and d, "unsupported architecture"),
    (lambda d: (d / "config.json").write_text("{not json") and d, "not valid JSON"),
])
def test_bad_directories_give_clear_errors(tmp_path, make, match):
    with pytest.raises(MatvlmError, match=match):
        matvlm.load(make(tmp_path))
