"""Text-model tools on tiny random models: the tokenizer chat template in training, prompt files,
self-generated data (resumable), eval-lm's scores against hand computations, and the CLI."""

import json
import math

import pytest
import torch

from matvlm.cli import main
from matvlm.convert import convert
from matvlm.convert.formats import load, load_processor
from matvlm.inputs.templates import TokenizerTemplate, text_template
from matvlm.engine.engine import Engine
from matvlm.errors import MatvlmError
from matvlm.lm.evaluate import eval_lm, score_text
from matvlm.lm.prompts import read_prompts, synthetic_prompts
from matvlm.lm.selfgen import self_generate

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def tok(teacher_dirs):
    return load_processor(teacher_dirs["causal-llama"])


def test_tokenizer_template_segments_match_the_rendered_chat(tok):
    tok.chat_template = CHATML
    t = TokenizerTemplate(tok)
    turns = [("hi", "hello!"), ("and?", "bye")]
    seg = t.segments(turns, False, system="be brief")
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye"}]
    assert "".join(s for s, _ in seg) == tok.apply_chat_template(msgs, tokenize=False)
    assert [s for s, a in seg if a] == ["hello!<|im_end|>\n", "bye<|im_end|>\n"]
    assert seg[0] == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n", False)


def test_tokenizer_template_that_rewrites_history_is_refused(tok):
    # a header counting the questions: the text of turn 0 changes when turn 1 is added
    tok.chat_template = ("{{ messages|selectattr('role', 'equalto', 'user')|list|length }}|"
                         "{% for m in messages %}{{ m['content'] }};{% endfor %}")
    with pytest.raises(MatvlmError, match="rewrites earlier turns"):
        TokenizerTemplate(tok).segments([("a", "b"), ("c", "d")], False)


def test_text_template_prefers_name_then_tokenizer(tok, teacher_dirs):
    cfg = load(teacher_dirs["causal-llama"]).config
    tok.chat_template = CHATML
    assert isinstance(text_template(tok, cfg), TokenizerTemplate)
    assert text_template(tok, cfg, "chatml").name == "chatml"
    tok.chat_template = None
    assert text_template(tok, cfg).name == "vicuna"  # llama family default


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\nfirst\n\n  second  \n")
    assert [p["messages"][0]["content"] for p in read_prompts(txt)] == ["first", "second"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps(
        {"id": "b", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "y"}]}) + "\n")
    assert [(p["id"], len(p["messages"])) for p in read_prompts(jl)] == [("a", 1), ("b", 2)]
    jl.write_text(json.dumps({"messages": [{"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}]}))
    with pytest.raises(MatvlmError, match="line 1: expected"):
        read_prompts(jl)
    with pytest.raises(MatvlmError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


def test_synthetic_prompts_are_distinct_and_heldout_topics_disjoint():
    from matvlm.lm.prompts import TOPICS_HELDOUT, TOPICS_TRAIN

    train, held = synthetic_prompts(500), synthetic_prompts(100, heldout=True)
    assert len(set(train)) == 500 and len(set(held)) == 100
    assert synthetic_prompts(500) == train
    assert not set(TOPICS_TRAIN) & set(TOPICS_HELDOUT)
    assert all(not any(t in p for t in TOPICS_TRAIN) for p in held if "the sun" not in p)
    with pytest.raises(MatvlmError, match="takes N from 1"):
        synthetic_prompts(10 ** 6)


def test_self_generate_writes_the_engine_answers_and_resumes(teacher_dirs, tmp_path):
    from matvlm.engine.engine import Request
    from matvlm.inputs.prompts import render
    from matvlm.engine.sampling import SamplingParams
    from matvlm.lm.selfgen import fingerprint

    d = teacher_dirs["causal-llama"]
    engine = Engine(load(d), load_processor(d), device="cpu")
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    out = tmp_path / "data.jsonl"
    fp = fingerprint(read_prompts(prompts))
    # an interrupted earlier run: one answer written, one line cut just before its newline, one cut mid-way
    partial = tmp_path / "data.jsonl.partial"
    kept = {"id": "1", "messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "kept"}],
            "finish_reason": "stop", "fp": fp}
    cut = dict(kept, id="2", messages=[{"role": "user", "content": "three"}, {"role": "assistant", "content": "x"}])
    partial.write_text(json.dumps(kept) + "\n" + json.dumps(cut))
    r = self_generate(engine, prompts, out, max_new_tokens=6, batch_size=2, progress=False)
    assert r["generated"] == 2 and not partial.exists()
    rows = {x["id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert rows["1"]["messages"][-1]["content"] == "kept"
    msgs = [{"role": "user", "content": "three"}]
    ref = engine.generate([Request(prompt=render(engine.processor, engine.model.config, msgs),
                                   params=SamplingParams(max_new_tokens=6))])[0].text.strip()
    if ref:
        assert rows["2"]["messages"] == msgs + [{"role": "assistant", "content": ref}]
    meta = json.loads((tmp_path / "data.jsonl.meta.json").read_text())
    assert meta["fingerprint"] == fp and meta["answers"] + len(meta["empty_ids"]) == 3
    # a finished output is reused for the same prompts and refused for others
    assert self_generate(engine, prompts, out, progress=False)["generated"] == 0
    prompts.write_text("one\ntwo\nfour\n")
    with pytest.raises(MatvlmError, match="was not written from these prompts"):
        self_generate(engine, prompts, out, progress=False)


def test_self_generate_leaves_out_empty_answers(teacher_dirs, tmp_path, monkeypatch):
    from matvlm.engine import engine as engine_mod

    d = teacher_dirs["causal-llama"]
    engine = Engine(load(d), load_processor(d), device="cpu")
    real = engine_mod.Engine.generate

    def some_empty(self, requests):
        outs = real(self, requests)
        outs[0].text = "  "                        # an answer that is only whitespace (or eos at once)
        return outs

    monkeypatch.setattr(engine_mod.Engine, "generate", some_empty)
    (tmp_path / "p.txt").write_text("a\nb\nc\n")
    r = self_generate(engine, tmp_path / "p.txt", tmp_path / "d.jsonl", max_new_tokens=3, batch_size=2,
                      progress=False)
    ids = [json.loads(x)["id"] for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert r["empty"] == 2 and ids == ["1"]           # first of each batch of 2 came out empty
    assert json.loads((tmp_path / "d.jsonl.meta.json").read_text())["empty_ids"] == ["0", "2"]


def _chat_jsonl(path, n=6):
    rows = [{"messages": [{"role": "user", "content": f"question {i}?"},
                          {"role": "assistant", "content": f"answer number {i} is {i * 7}"}]} for i in range(n)]
    rows.append({"text": "plain text counts every token"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_text_matches_a_hand_computation(teacher_dirs, tmp_path):
    from matvlm.inputs.data import TextJsonlDataset

    d = teacher_dirs["causal-llama"]
    hybrid = convert(d, tmp_path / "h", mamba_ratio=0.5)
    teacher, student, tok = load(d), load(hybrid), load_processor(d)
    ds = TextJsonlDataset(_chat_jsonl(tmp_path / "data.jsonl"), tok, text_template(tok, teacher.config), 128)
    got = score_text({"teacher": teacher, "student": student}, ds, batch_size=3, progress=False)
    nll = {"teacher": 0.0, "student": 0.0}
    kl = agree = n = 0.0
    with torch.no_grad():
        for i in range(len(ds)):  # one sequence at a time, no padding
            ids, labels = ds[i]["input_ids"][None], ds[i]["labels"]
            keep = labels[1:] != -100
            lt = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[keep]
            ls = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[keep]
            y = labels[1:][keep]
            nll["teacher"] -= lt[torch.arange(len(y)), y].sum().item()
            nll["student"] -= ls[torch.arange(len(y)), y].sum().item()
            kl += (lt.exp() * (lt - ls)).sum().item()
            agree += (lt.argmax(-1) == ls.argmax(-1)).sum().item()
            n += len(y)
    assert got["tokens"] == n
    for name in nll:
        assert got[name]["ppl"] == pytest.approx(math.exp(nll[name] / n), rel=1e-4)
    assert got["kl"] == pytest.approx(kl / n, rel=1e-3) and got["kl"] > 0
    assert got["agreement"] == pytest.approx(agree / n)
    same = score_text({"teacher": teacher, "student": teacher}, ds, progress=False)
    assert same["kl"] == pytest.approx(0, abs=1e-5) and same["agreement"] == 1.0


def test_eval_lm_cli_writes_json_and_table(teacher_dirs, tmp_path, capsys):
    d = teacher_dirs["causal-llama"]
    hybrid = convert(d, tmp_path / "h", mamba_ratio=0.5)
    data = _chat_jsonl(tmp_path / "data.jsonl")
    (tmp_path / "p.txt").write_text("hello\nworld\n")
    out = tmp_path / "r.json"
    assert main(["eval-lm", str(hybrid), "--teacher", str(d), "--data", str(data), "--prompts", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "4", "--output", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    rec = json.loads(out.read_text())
    assert "greedy agreement" in text and "> hello" in text
    assert rec["ppl_ratio"] == pytest.approx(rec["scores"]["student"]["ppl"] / rec["scores"]["teacher"]["ppl"])
    assert [a["prompt"] for a in rec["answers"]] == ["hello", "world"]
    assert set(rec["speed"]) == {"teacher", "student"} and rec["speed"]["student"]["new_tokens"] > 0


def test_eval_lm_refuses_a_vlm(teacher_dirs, tmp_path):
    with pytest.raises(MatvlmError, match="vision-language model"):
        eval_lm(teacher_dirs["llama"], _chat_jsonl(tmp_path / "d.jsonl"), device="cpu", progress=False)


def test_distill_self_generate_trains_on_the_teachers_answers(teacher_dirs, tmp_path, capsys):
    d = teacher_dirs["causal-llama"]
    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(d), "--mamba-ratio", "0.5", "--self-generate", str(tmp_path / "p.txt"),
                 "--self-generate-max-tokens", "5", "--out", str(out), "--max-steps", "2",
                 "--global-batch-size", "2", "--micro-batch-size", "2", "--save-every", "10"]) == 0
    data = [json.loads(x) for x in (out / "self-generated.jsonl").read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in data] == ["a", "b", "c", "d"]
    cfg = json.loads((out / "distill_config.json").read_text())
    assert cfg["data"] == str(out / "self-generated.jsonl")
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2
    assert f"step 2, {log[-1]['tokens_per_s']:.0f} real tokens/s over this run's" in capsys.readouterr().out


def test_distill_self_generate_with_data_is_refused(teacher_dirs, tmp_path, capsys):
    assert main(["distill", "--teacher", str(teacher_dirs["causal-llama"]), "--mamba-ratio", "0.5", "--self-generate",
                 "synthetic:4", "--data", "x.jsonl", "--out", str(tmp_path / "r")]) == 2
    assert "either --data or --self-generate" in capsys.readouterr().err


def test_import_gguf_without_a_file_or_package(tmp_path, monkeypatch, capsys):
    import matvlm.lm.gguf as g

    monkeypatch.setattr(g, "PACKAGED", {"no_such_package_xyz": "pip install no-such"})
    assert main(["import-gguf", "--out", str(tmp_path / "o")]) == 2
    assert "no --gguf FILE given and no packaged GGUF" in capsys.readouterr().err
    bad = tmp_path / "m.bin"
    bad.write_bytes(b"x")
    assert main(["import-gguf", "--gguf", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_import_gguf_needs_the_gguf_package(tmp_path, monkeypatch, capsys):
    import importlib.util

    import matvlm.lm.gguf as g

    real = importlib.util.find_spec
    monkeypatch.setattr(g.importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert main(["import-gguf", "--gguf", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "needs the 'gguf' package" in capsys.readouterr().err


def test_eval_lm_refuses_a_teacher_with_another_tokenizer(teacher_dirs, tmp_path):
    from matvlm.toy.tiny import save_teacher, tiny_causal_lm

    model, tok = tiny_causal_lm("llama", n_layer=2, kv_heads=2, seed=3)
    tok.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tok))
    other = save_teacher(model, tok, tmp_path / "other")
    with pytest.raises(MatvlmError, match="different tokenizers"):
        eval_lm(teacher_dirs["causal-llama"], _chat_jsonl(tmp_path / "d.jsonl"), teacher=other, device="cpu",
                progress=False)


def test_tokenizer_template_errors_are_one_clear_line(tok):
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
                        "{% endif %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(MatvlmError, match="refused the conversation: no system"):
        TokenizerTemplate(tok).segments([("q", "a")], False, system="s")
    # a template that writes answers differently from what the generation cue starts (R1-style reasoning)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}" \
                        "{% if add_generation_prompt %}assistant: <think>\n{% endif %}"
    with pytest.raises(MatvlmError, match="not the start of the answered conversation"):
        TokenizerTemplate(tok).segments([("q", "a")], False)


def test_jsonl_prompt_ids_do_not_collide_with_line_numbers(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"id": "1", "prompt": "x"}) + "\n" + json.dumps({"prompt": "y"}) + "\n")
    assert [p["id"] for p in read_prompts(jl)] == ["1", "line-2"]
    jl.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n" + json.dumps({"id": "a", "prompt": "y"}) + "\n")
    with pytest.raises(MatvlmError, match="id 'a' is used twice \\(prompts 1 and 2\\)"):
        read_prompts(jl)


def test_a_template_that_writes_bos_gets_no_second_one(teacher_dirs, tmp_path):
    """Training ids and engine prompt ids start with exactly one BOS when the chat template writes it."""
    from matvlm.inputs.data import TextJsonlDataset

    tok = load_processor(teacher_dirs["causal-llama"])
    if tok.bos_token is None:
        tok.add_special_tokens({"bos_token": "<s>"})
    tok.chat_template = "{{ bos_token }}" + CHATML
    ids = tok("hi")["input_ids"]
    adds_bos = ids[:1] == [tok.bos_token_id]
    ds = TextJsonlDataset(_chat_jsonl(tmp_path / "d.jsonl", n=1), tok, TokenizerTemplate(tok), 256)
    first = ds[0]["input_ids"].tolist()
    assert first[0] == tok.bos_token_id and first[1] != tok.bos_token_id, (adds_bos, first[:3])
    engine = Engine(load(teacher_dirs["causal-llama"]), tok, device="cpu")
    from matvlm.engine.engine import Request

    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    got, _ = engine.encode(Request(prompt))
    assert got[0] == tok.bos_token_id and got[1] != tok.bos_token_id


def test_distill_with_bad_data_leaves_the_output_reusable(teacher_dirs, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})
                   + "\n")
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(teacher_dirs["causal-llama"]), "--mamba-ratio", "0.5", "--out", str(out),
            "--max-steps", "1", "--global-batch-size", "1", "--micro-batch-size", "1", "--save-every", "10"]
    assert main(args + ["--data", str(bad)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (out / "distill_config.json").exists()     # nothing written: a fixed rerun may use the same --out
    assert main(args + ["--data", str(_chat_jsonl(tmp_path / "good.jsonl"))]) == 0


def test_distill_self_generate_checks_the_output_before_generating(teacher_dirs, tmp_path, capsys, monkeypatch):
    import matvlm.lm.selfgen as sg

    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    monkeypatch.setattr(sg, "self_generate", lambda *a, **k: pytest.fail("generated before checking --out"))
    assert main(["distill", "--teacher", str(teacher_dirs["causal-llama"]), "--mamba-ratio", "0.5",
                 "--self-generate", "synthetic:4", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("text,looping", [
    ("A lone soul, a lone soul, a lone soul", True),
    ("12 + 30 = 30 + 30 = 30 + 30 = 30", True),
    ("Neptune is about 178,840,000,000,000,000,000,000,000,000,000,000 km", True),
    ("It is big. It is also the most visited city. Yes. It is also the most visited city. "
     "It is also the most visited city.", True),
    ("In the depths of the ocean, a warrior of the sea, a warrior of the sea.", False),   # twice is not a loop
    ("1. Eat well. 2. Sleep well. 3. Exercise well.", False),
    ("about 1,000,000,000,000 stars", False),
    ("| a | b |\n|------------------------|---|", False),
    ("The capital of France is Paris.", False),
])
def test_loops_tells_repetition_from_lists_and_numbers(text, looping):
    from matvlm.lm.evaluate import loop_counts, loops

    assert loops(text) is looping
    assert loop_counts([{"teacher": "Paris.", "student": text}]) == {"teacher": 0, "student": int(looping)}
