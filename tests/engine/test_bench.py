"""`matvlm bench` helpers: the largest-batch search, cells beyond the model's context, the markdown table."""

import pytest
import torch

import matvlm
from matvlm.bench import speed
from matvlm.bench.speed import Cell, engine_cell, max_batch, table
from matvlm.engine.engine import Engine


class FakeEngine:
    """Runs out of memory above `fits` requests (None: never); records the batch sizes it was given."""

    def __init__(self, fits: int | None, max_batch_size: int = 64):
        self.fits, self.max_batch_size = fits, max_batch_size
        self._statics = {}
        self.calls = []

    def generate(self, requests):
        self.calls.append(len(requests))
        assert all(len(r.prompt) == 16 and r.params.max_new_tokens == 3 and r.params.ignore_eos for r in requests)
        self._statics[(len(requests), 256)] = object()         # what a real engine keeps allocated
        if self.fits is not None and len(requests) > self.fits:
            raise torch.OutOfMemoryError("fake: out of memory")
        return []


@pytest.mark.parametrize("fits, limit, want, capped", [
    (5, 64, 5, False),          # doubling to 8, bisection down to 5
    (None, 64, 64, True),       # never out of memory: the engine's max_batch_size, marked as capped
    (None, 48, 48, True),       # a cap that is no power of two is still reached
    (63, 64, 63, False),        # one below the cap is not capped
    (0, 64, 0, False),          # not even one request fits
    (1, 64, 1, False),
])
def test_max_batch_doubles_then_bisects(monkeypatch, fits, limit, want, capped):
    monkeypatch.setattr(speed, "_peak_reset", lambda: None)     # gc.collect and CUDA counters: slow, not needed
    eng = FakeEngine(fits, limit)
    r = max_batch(eng, context=16, vocab=50, gen=3)
    assert r["max_batch"] == want and r["capped"] is capped
    assert r["peak_GiB"] is None                                  # no CUDA: no peak memory
    assert len(eng.calls) <= 12                                   # logarithmic, not a linear scan
    assert max(eng.calls) <= limit                                # never beyond the engine's batch limit
    if want:
        assert want in eng.calls                                  # the answer was tried and fit
    if fits is not None and fits < limit:
        assert fits + 1 in eng.calls                              # ... and the next size was tried and failed
    assert eng._statics == {}                                     # every try frees its buffers


@pytest.fixture(scope="module")
def text_engine(teacher_dirs):
    path = teacher_dirs["causal-llama"]
    model = matvlm.load(path, dtype="float32")
    return Engine(model, matvlm.load_processor(path), device="cpu", dtype=torch.float32), model


def test_engine_cell_beyond_the_context_is_an_error_row(text_engine):
    eng, model = text_engine
    vocab = model.get_output_embeddings().out_features
    limit = model.config.max_position_embeddings
    assert limit == 4096
    r = engine_cell(eng, Cell(limit - 4, 1, 8), vocab)           # 4092 + 8 > 4096
    assert set(r) == {"error"} and "exceeds the model's context" in r["error"]
    eng._statics[(8, 4096)] = object()                           # another cell's bucket: freed first
    ok = engine_cell(eng, Cell(12, 1, 4), vocab)                 # within it: measured
    assert list(eng._statics) == [(1, 256)]
    assert "error" not in ok and "oom" not in ok
    assert ok["step_ms"] > 0 and ok["tokens_per_s"] > 0 and ok["prefill_ms"] > 0
    assert len(ok["first_tokens"]) == 4 and ok["peak_GiB"] is None


def test_table_renders_errors_ooms_and_the_largest_batches():
    res = {"rows": [
        {"system": "model (matvlm engine)", "context": 1024, "batch": 1, "gen": 8, "prefill_ms": 12.34,
         "step_ms": 1.5, "tokens_per_s": 666.7, "peak_GiB": 2.26, "roofline_ms": 0.75, "of_roofline": 0.5},
        {"system": "model (matvlm engine)", "context": 8192, "batch": 1, "gen": 8,
         "error": "prompt (8192 tokens) + max_new_tokens (8) exceeds the model's context of 4096 tokens"},
        {"system": "model (matvlm engine)", "context": 2048, "batch": 64, "gen": 8, "oom": True},
        {"system": "model (matvlm engine)", "context": 1024, "kind": "max_batch", "max_batch": 64, "peak_GiB": 30.0,
         "capped": True},
        {"system": "teacher (matvlm engine, compiled)", "context": 1024, "kind": "max_batch", "max_batch": 5,
         "peak_GiB": None, "capped": False},
    ]}
    lines = table(res).splitlines()
    assert "| model (matvlm engine) | 1024 | 1 | 8 | 12.3 | 1.50 | 666.7 | 2.3 | 0.75 | 50% |" in lines
    assert ("| model (matvlm engine) | 8192 | 1 | 8 | prompt (8192 tokens) + max_new_tokens (8) exceeds the "
            "model's context of 4096 tokens | | | | | |") in lines
    assert "| model (matvlm engine) | 2048 | 64 | 8 | OOM | | | | | |" in lines
    head = lines.index("| system | context | largest batch that fits | its peak GiB |")
    assert lines[head + 2:] == ["| model (matvlm engine) | 1024 | 64+ | 30.0 |",
                                "| teacher (matvlm engine, compiled) | 1024 | 5 |  |"]
    assert sum("max_batch" in line or "| 64+ |" in line for line in lines[:head]) == 0   # not in the speed table
    assert "largest batch" not in table({"rows": res["rows"][:3]})                      # no search, no section


def test_bench_refuses_generated_lengths_without_a_decode_step(tmp_path):
    from matvlm.bench.speed import run
    from matvlm.errors import MatvlmError

    with pytest.raises(MatvlmError, match="at least 2"):
        run("random:tinyllava-phi2", None, [16], [1], [1], tmp_path, device="cpu")


def test_max_batch_beyond_the_context_is_an_error_row(text_engine):
    eng, model = text_engine
    r = max_batch(eng, context=model.config.max_position_embeddings, vocab=model.get_output_embeddings().out_features)
    assert set(r) == {"error"} and "exceeds the model's context" in r["error"]
    assert "| exceeds" not in table({"rows": []})
    rendered = table({"rows": [{"system": "s", "context": 4096, "kind": "max_batch", **r}]})
    assert "| s | 4096 | prompt (4096 tokens)" in rendered


def test_transformers_cell_beyond_the_context_is_an_error_row(text_engine):
    from matvlm.bench.speed import hf_cell

    _, model = text_engine
    r = hf_cell(model, Cell(4092, 1, 8), model.get_output_embeddings().out_features, static=False)
    assert set(r) == {"error"} and "exceeds the model's context of 4096" in r["error"]


def test_out_of_memory_is_found_inside_wrapped_errors():
    from matvlm.engine.engine import _out_of_memory

    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("backend compiler failed") from inner
    except RuntimeError as wrapped:
        assert _out_of_memory(wrapped)
    assert not _out_of_memory(RuntimeError("inductor failed"))


def test_static_transformers_runs_only_on_cuda_for_the_chosen_contexts_and_batches():
    from matvlm.bench.speed import hf_variants

    assert hf_variants(Cell(4096, 8, 16), "cpu", None, [1, 8]) == [False]          # static compiles need CUDA
    assert hf_variants(Cell(4096, 1, 16), "cuda", None, [1]) == [False, True]
    assert hf_variants(Cell(4096, 8, 16), "cuda", None, [1]) == [False]            # the default: batch 1 only
    assert hf_variants(Cell(4096, 8, 16), "cuda", None, [1, 8]) == [False, True]
    assert hf_variants(Cell(4096, 1, 16), "cuda", [16384], [1]) == [False]
    assert hf_variants(Cell(16384, 1, 16), "cuda", [16384], [1]) == [False, True]


def test_bench_command_passes_the_static_batch_sizes_through(monkeypatch, tmp_path):
    from matvlm import commands
    from matvlm.bench import speed

    seen = {}
    monkeypatch.setattr(speed, "run", lambda *a, **kw: seen.update(kw) or {"rows": []})
    monkeypatch.setattr(speed, "table", lambda res: "")
    commands.bench("random:tinyllava-phi2", batch=[1, 8], out=tmp_path, hf_static_batch=[1, 8],
                   hf_static_context=["16k"])
    assert seen["hf_static_batches"] == [1, 8] and seen["hf_static_contexts"] == [16384]
    assert seen["pdl"] == [None]
    commands.bench("random:tinyllava-phi2", out=tmp_path, pdl="both")
    assert seen["pdl"] == [False, True]


def test_bench_measures_each_cell_under_each_launch_setting_in_turn(monkeypatch, tmp_path):
    from matvlm.bench.speed import run
    from matvlm.ops import backend
    from matvlm.toy.demo import ASSET

    settings = []
    real = speed.engine_cell
    monkeypatch.setattr(speed, "engine_cell", lambda *a: settings.append(backend._dependent_launch) or real(*a))
    backend.set_dependent_launch(True)                            # a caller's own setting
    try:
        res = run(str(ASSET), None, [16], [1], [4, 5], tmp_path, hf=False, dtype="float32", device="cpu",
                  pdl=[False, True])
        assert backend._dependent_launch is True                  # given back afterwards
    finally:
        backend.set_dependent_launch(None)
    assert settings == [False, True, False, True]               # off then on, cell by cell
    assert [(r["gen"], r["system"].split(")")[-1]) for r in res["rows"]] == [
        (4, " PDL off"), (4, " PDL on"), (5, " PDL off"), (5, " PDL on")]
    assert all(r["pdl"] is False for r in res["rows"])           # recorded: no dependent launch on a CPU


def test_static_transformers_cell_sizes_its_cache_to_its_own_length(text_engine):
    """generate keeps the longest static cache length it has made on the model and reuses it; a cell
    measured after a longer one would otherwise time and weigh the longer cache."""
    from matvlm.bench.speed import hf_cell

    _, model = text_engine
    model._previous_max_cache_length = 3000                      # as left by an earlier, longer cell
    r = hf_cell(model, Cell(12, 1, 3), model.get_output_embeddings().out_features, static=True)
    assert "error" not in r and "oom" not in r                   # measured (its timing is noise on CPU)
    assert model._previous_max_cache_length <= 15                # about 12 + 3, not 3000


def test_bench_streams_each_row_through_the_cli_and_the_library_prints_nothing(tmp_path, capsys):
    import json

    from matvlm.bench.speed import run
    from matvlm.cli import main
    from matvlm.toy.demo import ASSET

    seen = []
    res = run(str(ASSET), None, [16], [1, 2], [4], tmp_path / "lib", hf=False, dtype="float32", device="cpu",
              on_row=seen.append)
    assert capsys.readouterr().out == "" and seen == res["rows"] and len(seen) == 2
    assert main(["bench", str(ASSET), "--context", "16", "--batch", "1", "--gen", "4", "--no-hf", "--device", "cpu",
                 "--dtype", "float32", "--out", str(tmp_path / "cli")]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows == json.loads((tmp_path / "cli" / "bench.json").read_text())["rows"] and len(rows) == 1
