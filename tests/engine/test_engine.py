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
    five = eng.generate([Request(p, [image], params) for p in PROMPTS * 2 + PROMPTS[:1]])   # bucket of 6, padded
    assert [o.token_ids for o in five] == [o.token_ids for o in together * 2 + together[:1]]


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
    _, logits = record_prefill(eng)
    vlm = name != "text-hybrid"
    prompts = PROMPTS if vlm else ["the quick brown fox jumps over the lazy dog", "a"]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    whole = [o.token_ids for o in eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])]
    whole_logits = logits[-1]
    for tokens in (2 * 7, 2 * 5, 2 * 1):          # chunks of 7, 5 and 2 (the floor) positions, batch of 2
        eng.prefill_tokens = tokens
        chunked = [o.token_ids for o in eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])]
        assert chunked == whole, tokens
        # tiny models' greedy tokens barely depend on attention: the prompt's last logits must agree too
        torch.testing.assert_close(logits[-1], whole_logits, rtol=0, atol=1e-6)   # float32 logits


# --- compiled decode step ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["hybrid", "text-hybrid"])
def test_compiled_decode_equals_eager_and_does_not_recompile_for_a_new_length(models, image, name):
    """compile=True (torch.compile, dynamic shapes) decodes the same greedy tokens as the eager step, and
    one compilation serves every cache length bucket. float32: what inductor compiles in practice
    (float64 compiles too, in about the same time)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    path = models[name]
    engines = [Engine(matvlm.load(path, dtype="float32"), matvlm.load_processor(path), device="cpu",
                      dtype=torch.float32, compile=c) for c in (False, True)]
    eager, compiled = engines
    vlm = name == "hybrid"
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    def run(eng, prompts):
        outs = eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])
        assert all(len(o.token_ids) == 6 for o in outs)
        return [o.token_ids for o in outs], outs[0].timings["cache_length"]

    prompts = PROMPTS if vlm else ["the quick brown fox", "a"]              # ragged: left padding
    want, length = run(eager, prompts)
    assert counters["stats"]["unique_graphs"] == 0                          # the eager engine compiles nothing
    got, _ = run(compiled, prompts)
    assert got == want
    assert counters["stats"]["unique_graphs"] == 1 and compiled.compiled    # the step was compiled, once

    longer = [prompts[0].replace("the ", "the " + "very " * 60), prompts[1]]  # > 256 tokens: the next bucket
    want, longer_length = run(eager, longer)
    got, _ = run(compiled, longer)
    assert longer_length > length
    assert got == want
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1    # no recompilation


# --- unpadded chunked prefill -----------------------------------------------------------------

def record_prefill(eng):
    """Wrap the engine's prefill forward (decode steps call the method bound at construction) to record
    the attention mask each prefill chunk gets and the logits it returns."""
    masks, logits, forward = [], [], eng._forward

    def spy(embeds, position, mask4d, pad2d, cache):
        masks.append(mask4d)
        logits.append(forward(embeds, position, mask4d, pad2d, cache))
        return logits[-1]

    eng._forward = spy
    return masks, logits


@pytest.mark.parametrize("name", ["teacher", "text-hybrid"])
def test_unpadded_chunked_prefill_equals_one_prefill(models, image, name):
    """Without padding, the first chunk gets no mask (plain causal) and later ones a lower-right aligned
    causal bias over the cache written so far: same tokens as one prefill, for one prompt and for two
    prompts of the same length."""
    from torch.nn.attention.bias import CausalBias

    eng, _ = engine_for(models[name])
    masks, logits = record_prefill(eng)
    vlm = name == "teacher"
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    if vlm:     # byte tokenizer: "square" and "circle" take as many tokens
        prompts = [PROMPTS[0], PROMPTS[0].replace("square", "circle")]
        requests = [Request(p, [image], params) for p in prompts]
    else:
        g = torch.Generator().manual_seed(0)
        requests = [Request(ids, [], params) for ids in torch.randint(3, 250, (2, 23), generator=g).tolist()]
    assert len({len(eng.encode(r)[0]) for r in requests}) == 1
    one = requests[:1]

    whole = [o.token_ids for o in eng.generate(one)]
    whole_logits = logits[-1]
    whole2 = [o.token_ids for o in eng.generate(requests)]
    whole2_logits = logits[-1]
    assert masks == [None, None]                                          # one chunk each, no mask tensor
    assert whole2[0] == whole[0]
    for chunk in (7, 5, 2):
        masks.clear()
        eng.prefill_tokens = chunk                                        # batch 1: chunks of `chunk` positions
        assert [o.token_ids for o in eng.generate(one)] == whole, chunk
        # the tiny models' greedy tokens barely depend on attention: compare the prompt's last logits too
        torch.testing.assert_close(logits[-1], whole_logits, rtol=0, atol=1e-6)
        assert len(masks) > 2 and masks[0] is None
        # later chunks: a lower-right causal bias, or no mask for a lone last query (see the next test)
        assert all(isinstance(m, CausalBias) or m is None for m in masks[1:])
        assert any(isinstance(m, CausalBias) for m in masks[1:])
        eng.prefill_tokens = 2 * chunk                                    # batch 2: the same chunks
        assert [o.token_ids for o in eng.generate(requests)] == whole2, chunk
        torch.testing.assert_close(logits[-1], whole2_logits, rtol=0, atol=1e-6)


# --- pipelined greedy decode, mixed batches, short generations ---------------------------------

def test_greedy_batch_and_mixed_greedy_sampled_batch(models):
    """Greedy batches feed their own argmax forward on the device; once any request samples, the whole
    batch samples on the host, and its greedy rows must stay greedy."""
    eng, _ = engine_for(models["text-hybrid"])
    greedy = SamplingParams(max_new_tokens=9, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=9, temperature=2.0, seed=3, ignore_eos=True)
    a, b = "the quick brown fox", "a cat"
    alone = {p: eng.generate([Request(p, [], greedy)])[0].token_ids for p in (a, b)}
    sampled_b = eng.generate([Request(b, [], sampled)])[0].token_ids
    assert sampled_b != alone[b]                                          # it does sample

    both = eng.generate([Request(a, [], greedy), Request(b, [], greedy)])
    assert [o.token_ids for o in both] == [alone[a], alone[b]]
    mixed = eng.generate([Request(a, [], greedy), Request(b, [], sampled)])
    assert mixed[0].token_ids == alone[a]
    assert mixed[1].token_ids == sampled_b                                # its own seed, whatever the batch
    assert all(len(o.token_ids) == 9 for o in mixed)


@pytest.mark.parametrize("new", [1, 2])
def test_one_and_two_new_tokens(models, new):
    """max_new_tokens 1 (no decode step) and 2 give exactly that many tokens, the start of a longer run;
    the cache holds at least prompt + 3 positions (a captured step runs three past the prompt)."""
    eng, _ = engine_for(models["text-hybrid"])
    longer = eng.generate([Request("the cat", [], SamplingParams(max_new_tokens=5, ignore_eos=True))])[0].token_ids
    ids = [10 + i % 240 for i in range(254)]                              # 254 + 2 <= 256 < 254 + 3
    for prompt in ("the cat", ids):
        outs = eng.generate([Request(prompt, [], SamplingParams(max_new_tokens=new, ignore_eos=True))] * 2)
        assert [len(o.token_ids) for o in outs] == [new, new]
        assert all(o.finish_reason == "length" for o in outs)
        t = outs[0].timings
        assert t["decode_steps"] == new - 1
        assert t["cache_length"] >= outs[0].prompt_tokens + 3 and t["cache_length"] % 256 == 0
        if prompt == "the cat":
            assert outs[0].token_ids == longer[:new] and outs[1].token_ids == longer[:new]


def test_a_decode_step_that_fails_to_compile_falls_back_to_eager(models, caplog):
    eng, _ = engine_for(models["text-hybrid"])
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    want = eng.generate([Request("the quick brown fox", [], params)])[0].token_ids

    def broken(*args, **kwargs):
        raise RuntimeError("inductor failed")

    eng.compiled, eng._decode_forward = True, broken           # as if torch.compile had failed
    with caplog.at_level("WARNING", logger="matvlm.engine"):
        got = eng.generate([Request("the quick brown fox", [], params)])[0].token_ids
    assert got == want and eng.compiled is False
    assert "compiling the decode step failed (RuntimeError: inductor failed)" in caplog.text


def test_unpadded_prefill_whose_last_chunk_is_one_token(models):
    """A lone last query attends to every key written so far without a mask (a lower-right bias over a
    GQA query whose heads transformers folds into the query length would misalign on CUDA)."""
    eng, _ = engine_for(models["text-hybrid"])            # llama, 2 KV heads for 4 query heads: GQA
    ids = list(range(30, 51))                              # 21 tokens: chunks of 5 leave one token last
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    masks = []
    forward = eng._forward

    def spy(embeds, position, mask4d, pad2d, cache):
        masks.append(mask4d)
        return forward(embeds, position, mask4d, pad2d, cache)

    whole = eng.generate([Request(ids, [], params)])[0].token_ids
    eng.prefill_tokens, eng._forward = 5, spy
    chunked = eng.generate([Request(ids, [], params)])[0].token_ids
    prefill = masks[:5]
    assert chunked == whole
    assert prefill[0] is None and prefill[-1] is None
    assert all(m.seq_len_q == 5 and m.untyped_storage().nbytes() == 0 for m in prefill[1:-1])


@pytest.fixture(scope="module")
def phi_models(teacher_dirs, tmp_path_factory):
    return {"phi-teacher": teacher_dirs["phi"],
            "phi-hybrid": convert(teacher_dirs["phi"], tmp_path_factory.mktemp("eng") / "p", mamba_ratio=0.5)}


def _decode_states(eng, st, forward, steps):
    """Logits and cache tensors after each of `steps` decode steps run with `forward`."""
    eng._decode_forward = forward
    out = []
    for _ in range(steps):
        eng._decode_body(st)
        out.append([st.logits.clone()] + [t.clone() for t in st.cache.tensors()])
    return out


@pytest.mark.parametrize("name", ["phi-teacher", "phi-hybrid", "teacher", "hybrid", "text-hybrid"])
def test_fused_decode_step_equals_the_models_own_layers(models, phi_models, image, name):
    path = {**models, **phi_models}[name]
    model = matvlm.load(path, dtype="float64")
    before = sum(p.numel() for p in model.parameters())
    eng = Engine(model, matvlm.load_processor(path), device="cpu", dtype=torch.float64, fuse=True)
    vlm = not name.startswith("text")
    prompts = PROMPTS if vlm else ["the quick brown fox jumps", "a"]
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    eng.generate([Request(p, [image] if vlm else [], params) for p in prompts])   # prefill a ragged batch
    (st,) = eng._statics.values()
    start = [t.clone() for t in eng._step_tensors(st)] + [t.clone() for t in st.cache.tensors()]

    def restore():
        for t, s in zip(eng._step_tensors(st) + st.cache.tensors(), start):
            t.copy_(s)

    reference = _decode_states(eng, st, eng._forward, 4)
    restore()
    fused = _decode_states(eng, st, eng.fused.forward, 4)
    for ref, got in zip(reference, fused):
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
    # the fused matrices hold the weights: the model's parameters are views of them, not copies
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = eng.fused.layers
    assert all(layer.w_in.untyped_storage().data_ptr() in storages for layer in layers)
    assert sum(p.numel() for p in model.parameters()) == before
    assert len(storages) < len(list(model.parameters()))


@pytest.mark.parametrize("name", ["phi-hybrid", "text-hybrid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_steps_rotary_lookup_equals_the_models_rotary_embedding_bit_for_bit(models, phi_models, name, dtype):
    path = {**models, **phi_models}[name]
    eng = Engine(matvlm.load(path, dtype="float32"), matvlm.load_processor(path), device="cpu", dtype=dtype, fuse=True)
    fused, rotary = eng.fused, eng.stack.rotary_emb
    d = eng.model.get_input_embeddings().weight.shape[1]
    embeds = torch.randn(5, 1, d, dtype=dtype)
    position = torch.tensor([[0], [1], [37], [299], [300]])
    cos, sin = fused._rotary(embeds, position, 301)
    assert fused._rope_tables[(embeds.device, dtype)][0].shape[0] == 512        # a power of two >= the cache
    ref_cos, ref_sin = rotary(embeds, position)
    assert cos.dtype == dtype and torch.equal(cos, ref_cos[:, 0]) and torch.equal(sin, ref_sin[:, 0])
    first = fused._rope_tables[(embeds.device, dtype)]
    cos, sin = fused._rotary(embeds, torch.tensor([[1500]] * 5), 2000)           # a longer cache: a new table
    assert torch.equal(cos, rotary(embeds, torch.tensor([[1500]] * 5))[0][:, 0])
    assert fused._rope_tables[(embeds.device, dtype)][0].shape[0] == 2048
    assert any(t is first for t in fused._rope_kept)        # graphs captured with the first still read it
    rotary.rope_type = "dynamic"                             # rescales with the length: computed each step
    again = Engine(eng.model, matvlm.load_processor(path), device="cpu", dtype=dtype, fuse=True).fused
    cos, _ = again._rotary(embeds, position, 301)
    assert not again._rope_tables and torch.equal(cos, ref_cos[:, 0])


def test_a_model_whose_weights_the_fused_step_shares_still_saves_and_reloads(phi_models, tmp_path):
    model = matvlm.load(phi_models["phi-hybrid"], dtype="float32")
    Engine(model, matvlm.load_processor(phi_models["phi-hybrid"]), device="cpu", fuse=True)
    model.save_pretrained(tmp_path / "saved")
    again = matvlm.load(tmp_path / "saved", dtype="float32")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


# --- batched sampling on the device ---------------------------------------------------------------

def test_batched_sampling_follows_the_filtered_softmax():
    """Gumbel-max over counter-based noise draws from softmax(logits / T) restricted to the top-k / top-p set:
    empirical frequencies over 20 000 steps match within 1.5 %, and filtered-out tokens never appear."""
    from matvlm.engine.sampling import sample_batch

    logits = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, -3.0])
    cases = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=3),
             SamplingParams(temperature=1.3, top_p=0.8)]
    steps = 20000
    for p in cases:
        rows = logits.repeat(steps, 1)
        drawn = sample_batch(rows, [p] * steps, None, torch.full((steps,), 11, dtype=torch.int64),
                             torch.arange(steps))
        freq = torch.bincount(drawn, minlength=6).float() / steps
        want = torch.softmax(filter_top_k_top_p(logits / p.temperature, p.top_k, p.top_p), 0)
        assert (freq - want).abs().max() < 0.015, (p, freq, want)
        assert (freq[want == 0] == 0).all()


def test_batched_sampling_depends_on_a_rows_seed_and_step_only():
    from matvlm.engine.sampling import counter_uniform, sample_batch

    torch.manual_seed(0)
    logits = torch.randn(5, 300)
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(), SamplingParams(temperature=2.0, top_k=20),
              SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, repetition_penalty=1.3)]
    seen = torch.rand(5, 300) < 0.1
    keys, counters = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 7, 7, 9, 3])
    together = sample_batch(logits, params, seen, keys, counters)
    for i in range(5):
        alone = sample_batch(logits[i:i + 1], params[i:i + 1], seen[i:i + 1], keys[i:i + 1], counters[i:i + 1])
        assert alone.item() == together[i].item()
    assert together[1].item() == logits[1].argmax().item()                   # greedy rows stay greedy
    u = counter_uniform(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 50000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])       # another step, another key


def test_engine_from_dir_is_the_engine_over_the_loaded_model_and_its_processor():
    import matvlm
    from matvlm.engine.engine import Engine, Request
    from matvlm.engine.sampling import SamplingParams
    from matvlm.inputs.prompts import render
    from matvlm.toy.demo import ASSET

    a = Engine.from_dir(ASSET, device="cpu", dtype="float32")
    b = Engine(matvlm.load(ASSET), matvlm.load_processor(ASSET), device="cpu", dtype=torch.float32)
    assert a.dtype == torch.float32 and a.image_aspect == b.image_aspect
    prompt = render(a.processor, a.model.config, [{"role": "user", "content": "Describe the image."}])
    req = [Request(prompt, [], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    assert a.generate(req)[0].token_ids == b.generate(req)[0].token_ids
