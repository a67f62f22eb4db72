"""Cached generation with the hybrid cache, checked against uncached full forwards."""

import pytest
import torch
from transformers import DynamicCache

import matvlm
from matvlm.convert import convert


@pytest.fixture(scope="module")
def hybrids(teacher_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrids")
    return {
        "phi-50": convert(teacher_dirs["phi"], root / "phi-50", mamba_ratio=0.5),
        "llama-gqa-25": convert(teacher_dirs["llama"], root / "llama-25", mamba_ratio=0.25),
        "qwen2-begin": convert(teacher_dirs["qwen2"], root / "qwen2-begin", mamba_ratio=0.5, placement="begin"),
        "text-all-mamba": convert(teacher_dirs["causal-llama"], root / "all", mamba_ratio=1.0),
    }


def vlm_inputs(path, image, prompts):
    proc = matvlm.load_processor(path)
    proc.tokenizer.padding_side = "left"
    text = [f"USER: <image>\n{p} ASSISTANT:" for p in prompts]
    return proc(images=[image] * len(prompts), text=text, return_tensors="pt", padding=True)


def text_inputs(path, prompts):
    tok = matvlm.load_processor(path)
    tok.padding_side = "left"
    return tok(prompts, return_tensors="pt", padding=True)


def greedy_by_full_forwards(model, inputs, steps):
    """Greedy tokens from uncached forwards over the whole sequence at every step."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(out, 1)


def generate(model, inputs, steps, **kw):
    with torch.no_grad():
        g = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **kw)
    return g[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", ["phi-50", "llama-gqa-25", "qwen2-begin", "text-all-mamba"])
def test_cached_greedy_equals_argmax_of_full_forward(hybrids, image, name):
    model = matvlm.load(hybrids[name]).double()
    if name.startswith("text"):
        inputs = text_inputs(hybrids[name], ["the cat sat on", "a"])
    else:
        inputs = vlm_inputs(hybrids[name], image, ["what colour is it?", "count them"])
    inputs = {k: (v.double() if v.is_floating_point() else v) for k, v in inputs.items()}
    steps = 6
    assert torch.equal(generate(model, inputs, steps), greedy_by_full_forwards(model, inputs, steps))


def test_left_padded_batch_equals_each_prompt_alone(hybrids, image):
    path = hybrids["phi-50"]
    model = matvlm.load(path).double()
    prompts = ["what colour is the big square on the left?", "how many?"]
    batch = vlm_inputs(path, image, prompts)
    batch["pixel_values"] = batch["pixel_values"].double()
    assert (batch["attention_mask"] == 0).any(), "the batch must contain left padding"
    together = generate(model, batch, 5)
    for i, p in enumerate(prompts):
        alone = vlm_inputs(path, image, [p])
        alone["pixel_values"] = alone["pixel_values"].double()
        assert torch.equal(generate(model, alone, 5)[0], together[i]), f"prompt {i} differs when batched"


def test_a_plain_dynamic_cache_gets_mamba_states_installed(hybrids):
    path = hybrids["llama-gqa-25"]
    model = matvlm.load(path).double()
    inputs = text_inputs(hybrids["text-all-mamba"], ["hello there"])        # same byte tokenizer
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with torch.no_grad():
        default = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, past_key_values=DynamicCache())
    assert torch.equal(default, plain)


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_generate_takes_a_cache_under_either_name_without_a_deprecation_warning(hybrids, keyword):
    """Callers written for transformers < 5.24 pass `past_key_values`, newer ones `cache`: both get the same
    greedy tokens as uncached full forwards, the given cache is the one filled, and no FutureWarning is raised."""
    import warnings

    path = hybrids["llama-gqa-25"]
    model = matvlm.load(path).double()
    inputs = text_inputs(hybrids["text-all-mamba"], ["hello there", "a"])
    inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    cache = model.new_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        got = generate(model, inputs, 5, **{keyword: cache})
    assert torch.equal(got, greedy_by_full_forwards(model, inputs, 5))
    assert cache.get_seq_length() == inputs["input_ids"].shape[1] + 4          # the last token is not fed back
