"""General-text self-generation (`self-generate --kind text`): the mix of items, resumption, the
duplicate / loop / length filters, and that distillation reads what it writes."""

import json

import pytest

from matvlm.cli import main
from matvlm.convert.formats import load, load_processor
from matvlm.engine.engine import Engine, Output
from matvlm.errors import MatvlmError
from matvlm.lm.textgen import document_start, generate_text_corpus, plan_item, repetitive


@pytest.fixture(scope="module")
def engine(teacher_dirs):
    d = teacher_dirs["causal-llama"]
    return Engine(load(d), load_processor(d), device="cpu")


def rows_of(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_items_mix_chats_documents_and_seeds_deterministically():
    items = [plan_item(i, 7, 0.3, 0.2) for i in range(2000)]
    assert items == [plan_item(i, 7, 0.3, 0.2) for i in range(2000)]
    share = {k: sum(it["kind"] == k for it in items) / len(items) for k in ("chat", "document", "seed")}
    assert abs(share["chat"] - 0.3) < 0.04 and abs(share["document"] - 0.2) < 0.04
    chats = [it for it in items if it["kind"] == "chat"]
    assert 0.4 < sum(it["greedy"] for it in chats) / len(chats) < 0.6
    assert len({it["seed_text"] for it in items if it["kind"] == "seed"}) > 50
    assert plan_item(5, 8, 0.3, 0.2) != plan_item(5, 7, 0.3, 0.2) or plan_item(6, 8, 0.3, 0.2) != plan_item(6, 7, 0.3, 0.2)


def test_repetitive_finds_loops_only():
    assert repetitive([1, 2, 3, 4] * 40)
    assert not repetitive(list(range(160)))
    assert not repetitive([1, 2] * 10)                     # too short to judge


def test_document_start_is_bos_or_the_document_separator(engine):
    tok = engine.tokenizer
    ids = document_start(tok)
    assert len(ids) == 1 and ids[0] in (tok.bos_token_id, tok.eos_token_id,
                                        tok.get_vocab().get("<|endoftext|>"))


def test_generation_reaches_the_budget_and_a_cut_run_resumes_to_the_same_file(engine, tmp_path, monkeypatch):
    kw = dict(tokens=200, max_new_tokens=24, min_tokens=4, batch_size=4, seed=3, progress=False)
    full = generate_text_corpus(engine, tmp_path / "full.jsonl", **kw)
    rows = rows_of(tmp_path / "full.jsonl")
    assert full["tokens"] >= 200 and full["rows"] == len(rows)
    assert {("messages" in r) for r in rows} == {True, False}                 # chats and plain text
    assert len({r["id"] for r in rows}) == len(rows)
    seeded = [r for r in rows if r["id"].startswith("s")]
    assert seeded and all(r["text"].startswith(plan_item(int(r["id"][1:]), 3, 0.3, 0.2)["seed_text"]) for r in seeded)
    meta = json.loads((tmp_path / "full.jsonl.meta.json").read_text())
    assert meta["result"]["tokens"] == full["tokens"] and meta["settings"]["seed"] == 3

    # the same run killed during its third batch: two batches written, then a line cut mid-way
    real, calls = Engine.generate, {"n": 0}

    def dies_in_batch_3(self, requests):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, requests)

    monkeypatch.setattr(Engine, "generate", dies_in_batch_3)
    with pytest.raises(KeyboardInterrupt):
        generate_text_corpus(engine, tmp_path / "cut.jsonl", **kw)
    monkeypatch.setattr(Engine, "generate", real)
    partial = tmp_path / "cut.jsonl.partial"
    assert len(partial.read_text().splitlines()) == 8
    with partial.open("a") as f:
        f.write('{"i": 8, "fp": "x", "kind": "seed", "n": 1')                 # a line cut by the kill
    resumed = generate_text_corpus(engine, tmp_path / "cut.jsonl", **kw)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "full.jsonl").read_text()
    assert resumed["tokens"] == full["tokens"] and not partial.exists()
    # a finished output is reused for the same settings and refused for others
    assert generate_text_corpus(engine, tmp_path / "full.jsonl", **kw)["generated_tokens"] == 0
    with pytest.raises(MatvlmError, match="other settings"):
        generate_text_corpus(engine, tmp_path / "full.jsonl", **{**kw, "seed": 4})


def test_duplicates_loops_and_short_sequences_are_dropped_and_counted(engine, tmp_path, monkeypatch):
    def out(text, ids):
        return Output(text, ids, "length", prompt_tokens=1, timings={})

    outputs = iter([
        out("the same text here", list(range(40))),
        out("The  same text HERE", list(range(40, 80))),                  # a duplicate once normalised
        out("a loop", [1, 2, 3, 4] * 20),
        out("hi", [5, 6]),
    ] + [out(f"fresh text number {k}", list(range(100 + 50 * k, 140 + 50 * k))) for k in range(40)])

    def fake(self, requests):
        return [next(outputs) for _ in requests]

    monkeypatch.setattr(Engine, "generate", fake)
    monkeypatch.setattr("matvlm.lm.textgen.plan_item",
                        lambda i, seed, c, d: {"id": f"d{i}", "kind": "document", "seed_text": "", "greedy": False})
    r = generate_text_corpus(engine, tmp_path / "g.jsonl", tokens=100, min_tokens=8, batch_size=4, progress=False)
    assert r["dropped"] == {"duplicate": 1, "repetitive": 1, "short": 1}
    texts = [x["text"] for x in rows_of(tmp_path / "g.jsonl")]
    assert texts[0] == "the same text here" and "a loop" not in texts and "hi" not in texts
    assert r["tokens"] >= 100 and r["tokens"] == 40 * len(texts)


def test_distillation_reads_the_generated_corpus_even_with_an_image_placeholder_in_the_text(teacher_dirs, tmp_path):
    """For a text model "<image>" is ordinary text (generated text may contain it)."""
    from matvlm.inputs.data import TextJsonlDataset
    from matvlm.inputs.templates import text_template

    d = teacher_dirs["causal-llama"]
    tok = load_processor(d)
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"id": "d1", "text": "an <image> tag in html"}) + "\n" + json.dumps(
        {"id": "c2", "messages": [{"role": "user", "content": "say <image>"},
                                  {"role": "assistant", "content": "<image>"}]}) + "\n")
    ds = TextJsonlDataset(data, tok, text_template(tok, load(d).config), 64)
    assert len(ds) == 2 and (ds[0]["labels"] != -100).all()


def test_cli_kind_text_needs_tokens_and_no_prompts(teacher_dirs, tmp_path, capsys):
    d = teacher_dirs["causal-llama"]
    assert main(["self-generate", str(d), "--kind", "text", "--out", str(tmp_path / "g.jsonl"),
                 "--prompts", "synthetic:3"]) == 2
    assert "--kind text takes --tokens" in capsys.readouterr().err
    assert main(["self-generate", str(d), "--out", str(tmp_path / "g.jsonl")]) == 2
    assert "--kind chat takes --prompts" in capsys.readouterr().err
    assert main(["self-generate", str(d), "--kind", "text", "--tokens", "60", "--max-new-tokens", "40",
                 "--batch-size", "4", "--out", str(tmp_path / "g.jsonl"), "--device", "cpu"]) == 0
    assert "tokens" in capsys.readouterr().out and (tmp_path / "g.jsonl").is_file()


def test_a_teacher_whose_every_output_is_dropped_stops_with_an_error(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(Engine, "generate", lambda self, reqs: [Output("x", [1], "stop", prompt_tokens=1, timings={})
                                                                for _ in reqs])
    with pytest.raises(MatvlmError, match="kept nothing"):
        generate_text_corpus(engine, tmp_path / "g.jsonl", tokens=100, min_tokens=4, batch_size=2, progress=False)
    with pytest.raises(MatvlmError, match="exceeds --max-new-tokens"):
        generate_text_corpus(engine, tmp_path / "h.jsonl", tokens=100, max_new_tokens=8, progress=False)


def test_text_with_unicode_line_separators_survives_a_resume_and_reads_as_one_line(engine, tmp_path, monkeypatch):
    """JSONL lines end at "\\n": generated text holding U+2028 / U+0085 once cut the partial file short
    (str.splitlines splits there), silently keeping 11 % of an H200 run's tokens."""
    from matvlm.inputs.data import read_records

    odd = "first\u2028second\u0085third\x1cfourth"
    outs = iter([Output(f"{odd} {k}", list(range(50 * k, 50 * k + 40)), "length", prompt_tokens=1, timings={})
                 for k in range(20)])
    monkeypatch.setattr(Engine, "generate", lambda self, reqs: [next(outs) for _ in reqs])
    monkeypatch.setattr("matvlm.lm.textgen.plan_item",
                        lambda i, seed, c, d: {"id": f"d{i}", "kind": "document", "seed_text": "", "greedy": False})
    r = generate_text_corpus(engine, tmp_path / "g.jsonl", tokens=200, min_tokens=8, batch_size=2, progress=False)
    rows = read_records(tmp_path / "g.jsonl")
    assert r["rows"] == len(rows) == 6 and rows[0]["text"] == f"{odd} 0"


def test_continuous_generation_writes_the_same_corpus_and_resumes_after_a_cut(engine, tmp_path, monkeypatch):
    """--continuous: slots take the next item as soon as one finishes, results are written in item order,
    so the corpus equals the static batches' (greedy and seeded sampled items alike, here in float32),
    and a run cut mid-way resumes to the same file."""
    from matvlm.engine.scheduler import ContinuousBatcher

    kw = dict(tokens=200, max_new_tokens=24, min_tokens=4, batch_size=4, seed=3, progress=False)
    generate_text_corpus(engine, tmp_path / "static.jsonl", **kw)
    cont = generate_text_corpus(engine, tmp_path / "cont.jsonl", continuous=True, **kw)
    assert (tmp_path / "cont.jsonl").read_text() == (tmp_path / "static.jsonl").read_text()
    assert cont["generated_tokens"] > 0

    real, calls = ContinuousBatcher.step, {"n": 0}

    def dies_at_step_40(self):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(ContinuousBatcher, "step", dies_at_step_40)
    with pytest.raises(KeyboardInterrupt):
        generate_text_corpus(engine, tmp_path / "cut.jsonl", continuous=True, **kw)
    monkeypatch.setattr(ContinuousBatcher, "step", real)
    assert (tmp_path / "cut.jsonl.partial").read_text()                       # some items were written
    generate_text_corpus(engine, tmp_path / "cut.jsonl", continuous=True, **kw)
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "static.jsonl").read_text()
