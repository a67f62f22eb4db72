"""The engine against transformers' generate and against itself (ragged batches, seeds, stops, streaming)."""

import pytest
import torch

import matvlm
from matvlm.convert import convert
from matvlm.engine.engine import Engine, Request
from matvlm.engine.sampling import SamplingParams, apply_repetition_penalty, filter_top_k_top_p, sample_row

PROMPTS = ["USER: <image>\nwhat colour is the big square?\nASSISTANT:", "USER: <image>\nhow many?\nASSISTANT:"]


@pytest.fixture(scope="module")
def models(teacher_dirs, tmp_path_factory):
    hybrid = convert(teacher_dirs["qwen2"], tmp_path_factory.mktemp("eng") / "h", mamba_ratio=0.5)
    text_hybrid = convert(teacher_dirs["causal-llama"], tmp_path_factory.mktemp("eng") / "t", mamba_ratio=0.5)
    return {"teacher": teacher_dirs["qwen2"], "hybrid": hybrid, "text-teacher": teacher_dirs["causal-llama"],
            "text-hybrid": text_hybrid}


def engine_for(path):
    model = matvlm.load(path, dtype="float64")
    return Engine(model, matvlm.load_processor(path), device="cpu", dtype=torch.float64), model


def hf_greedy(model, processor, prompts, image, n):
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    if image is not None:
        inp = processor(text=prompts, images=[image] * len(prompts), return_tensors="pt", padding=True)
        inp["pixel_values"] = inp["pixel_values"].double()
    else:
        inp = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inp, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    rows = out[:, inp["input_ids"].shape[1]:].tolist()
    eos = tok.eos_token_id
    return [r[:r.index(eos)] if eos in r else r for r in rows]


@pytest.mark.parametrize("name", ["teacher", "hybrid", "text-teacher", "text-hybrid"])
def test_greedy_equals_transformers_generate(models, image, name):
    eng, model = engine_for(models[name])
    vlm = not name.startswith("text")
    prompts = PROMPTS if vlm else ["the quick brown fox", "a"]
    reqs = [Request(p, [image] if vlm else [], SamplingParams(max_new_tokens=7)) for p in prompts]
    ours = [o.token_ids for o in eng.generate(reqs)]
    assert ours == hf_greedy(model, eng.processor, prompts, image if vlm else None, 7)


def test_ragged_batch_equals_each_prompt_alone(models, image):
    eng, _ = engine_for(models["hybrid"])
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    together = eng.generate([Request(p, [image], params) for p in PROMPTS])
    for i, p in enumerate(PROMPTS):
        assert eng.generate([Request(p, [image], params)])[0].token_ids == together[i].token_ids
    three = eng.generate([Request(p, [image], params) for p in PROMPTS + PROMPTS[:1]])   # bucket of 4, padded
    assert [o.token_ids for o in three[:2]] == [o.token_ids for o in together]


def test_seeded_sampling_is_reproducible_and_seeds_differ(models):
    eng, _ = engine_for(models["text-hybrid"])
    def run(seed):
        return eng.generate([Request("the cat", [], SamplingParams(max_new_tokens=12, temperature=1.5, seed=seed,
                                                                     ignore_eos=True))])[0].token_ids
    assert run(7) == run(7)
    assert run(7) != run(8)


def test_top_k_one_and_tiny_top_p_are_greedy(models):
    eng, _ = engine_for(models["text-hybrid"])
    greedy = eng.generate([Request("the cat", [], SamplingParams(max_new_tokens=8, ignore_eos=True))])[0].token_ids
    for p in (SamplingParams(max_new_tokens=8, temperature=3.0, top_k=1, seed=1, ignore_eos=True),
              SamplingParams(max_new_tokens=8, temperature=3.0, top_p=1e-6, seed=1, ignore_eos=True)):
        assert eng.generate([Request("the cat", [], p)])[0].token_ids == greedy


def test_filters_keep_exactly_the_allowed_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert torch.isfinite(filter_top_k_top_p(logits, 3, 1.0)).tolist() == [True, True, True, False, False]
    p = torch.softmax(logits, 0)                       # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(filter_top_k_top_p(logits, 0, 0.8)).tolist()
    assert kept == [True, True, False, False, False] and p[0] < 0.8 <= p[0] + p[1]
    gen = torch.Generator().manual_seed(0)
    draws = {sample_row(logits, SamplingParams(temperature=5.0, top_k=2), None, gen) for _ in range(200)}
    assert draws == {0, 1}


def test_repetition_penalty():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([True, True, False])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -4.0, 1.0]


def test_stop_strings_cut_and_streaming_concatenates(models):
    eng, _ = engine_for(models["text-hybrid"])
    full = eng.generate([Request("the cat", [], SamplingParams(max_new_tokens=20, ignore_eos=True))])[0]
    assert len(full.text) >= 6 and full.finish_reason == "length"
    stop = full.text[3:5]
    cut = eng.generate([Request("the cat", [], SamplingParams(max_new_tokens=20, stop=[stop], ignore_eos=True))])[0]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.index(stop)]
    streamed = "".join(eng.stream(Request("the cat", [], SamplingParams(max_new_tokens=20, ignore_eos=True))))
    assert streamed == full.text


def test_too_long_prompt_and_images_for_text_model_are_refused(models, image):
    from matvlm.errors import MatvlmError

    eng, _ = engine_for(models["text-hybrid"])
    with pytest.raises(MatvlmError, match="exceeds the model's context"):
        eng.generate([Request("x", [], SamplingParams(max_new_tokens=10 ** 6))])
    with pytest.raises(MatvlmError, match="takes no images"):
        eng.generate([Request("x", [image], SamplingParams(max_new_tokens=2))])


@pytest.mark.parametrize("name", ["hybrid", "text-hybrid", "teacher"])
def test_chunked_prefill_equals_one_prefill(models, image, name):
    """Prefill in chunks (attention reads the cache of earlier chunks, Mamba-2 carries its state,
    left padding and image tokens straddle chunk borders) gives what one prefill gives."""
    eng, _ = engine_for(models[name])
    vlm = name != "text-hybrid"
    prompts = PROMPTS if vlm else ["the quick brown fox jumps over the lazy dog", "a"]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    whole = [o.token_ids for o in eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])]
    for tokens in (2 * 7, 2 * 5, 2 * 1):          # chunks of 7, 5 and 2 (the floor) positions, batch of 2
        eng.prefill_tokens = tokens
        chunked = [o.token_ids for o in eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])]
        assert chunked == whole, tokens
