"""`matvlm bench-serve`: one workload sent to each scheduler's server, every request timed."""

import json

import pytest

from matvlm.bench import serve_load
from matvlm.cli import main
from matvlm.toy.demo import ASSET


def test_bench_serve_runs_one_workload_against_both_schedulers_and_times_every_request(tmp_path, capsys):
    out = tmp_path / "bs"
    assert main(["bench-serve", str(ASSET), "--requests", "6", "--rate", "20", "--max-tokens", "3:12",
                 "--prompt-words", "2:20", "--max-batch", "3", "--image-fraction", "0.5", "--out", str(out),
                 "--device", "cpu", "--dtype", "float32", "--warmup", "2", "--prefill-tokens", "16"]) == 0
    printed = capsys.readouterr().out
    assert "TTFT p95 (ms)" in printed and "static" in printed and "continuous" in printed
    rec = json.loads((out / "bench-serve.json").read_text())
    asked = [w["max_tokens"] for w in rec["workload"]]
    assert rec["prefill_tokens"] == 16
    assert rec["pdl"] is False                             # recorded with the run; no dependent launch on a CPU
    assert any(w["image"] for w in rec["workload"]) and not all(w["image"] for w in rec["workload"])
    for name in ("static", "continuous"):
        warm = rec["warmup"][name]                         # served before the timed run, not in its figures
        assert warm["requests"] == 2 and warm["failed"] == 0 and 2 <= warm["completion_tokens"] <= 24
        s = rec["summaries"][name]
        assert s["failed"] == 0 and s["short_answers"] == 0 and s["output_tokens"] == sum(asked)
        for metric in ("ttft_s", "itl_s", "e2e_s"):
            assert 0 <= s[metric]["p50"] <= s[metric]["p95"] <= s[metric]["p99"]
        for r, n in zip(rec["requests"][name], asked):
            assert r["completion_tokens"] == n and r["error"] is None
            assert r["sent"] <= r["chunks"][0] <= r["chunks"][-1] <= r["done"]
    assert (out / "bench-serve.png").stat().st_size > 10_000 and (out / "bench-serve.md").exists()


def test_workloads_are_poisson_seeded_and_checked():
    a = serve_load.make_workload(200, rate=10.0, prompt_words=(1, 5), max_tokens=(2, 4), seed=3)
    assert a == serve_load.make_workload(200, rate=10.0, prompt_words=(1, 5), max_tokens=(2, 4), seed=3)
    gaps = [y.at - x.at for x, y in zip(a, a[1:])]
    assert 0.07 < sum(gaps) / len(gaps) < 0.13                  # mean inter-arrival 1 / rate
    assert {r.max_tokens for r in a} == {2, 3, 4} and all(r.image is None for r in a)
    assert all(r.at == 0 for r in serve_load.make_workload(5, rate=0, prompt_words=(1, 1), max_tokens=(1, 1)))
    with pytest.raises(ValueError, match="max tokens"):
        serve_load.make_workload(3, 1.0, (1, 2), (5, 2))


def test_log_uniform_answer_lengths_have_a_long_tail_within_the_range():
    def lengths(dist):
        return [r.max_tokens for r in serve_load.make_workload(4000, 0, (1, 1), (16, 1024), seed=5, answer_lengths=dist)]

    log, uni = lengths("log-uniform"), lengths("uniform")
    assert min(log) == 16 and max(log) == 1024 and min(uni) >= 16 and max(uni) <= 1024
    # each doubling of length about equally likely: 16-31, 32-63, ..., 512-1023 hold 1/6 each
    for lo in (16, 32, 64, 128, 256, 512):
        assert abs(sum(lo <= n < 2 * lo for n in log) / len(log) - 1 / 6) < 0.03
    log_median, uni_median = sorted(log)[2000], sorted(uni)[2000]
    assert log_median < 160 < 450 < uni_median                       # mostly short answers, a few long ones
    with pytest.raises(ValueError, match="uniform or log-uniform"):
        serve_load.make_workload(3, 1.0, (1, 2), (1, 2), answer_lengths="zipf")


def test_summary_percentiles_are_nearest_rank_and_failures_are_counted_not_timed():
    ok = [serve_load.Result(sent=0.0, max_tokens=2, chunks=[t, t + 0.01], done=t + 0.02, completion_tokens=2)
          for t in (0.1, 0.2, 0.3, 0.4)]
    bad = serve_load.Result(sent=0.0, max_tokens=2, error="HTTP 429: full")
    s = serve_load.summarize(ok + [bad])
    assert s["failed"] == 1 and s["errors"] == ["HTTP 429: full"] and s["output_tokens"] == 8
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["p95"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx(8 / 0.42)


def test_bench_serve_refuses_bad_arguments_in_one_line(capsys):
    assert main(["bench-serve", "--max-tokens", "9:3", "--url", "http://127.0.0.1:9/v1"]) == 2
    assert "--max-tokens must satisfy" in capsys.readouterr().err
    assert main(["bench-serve"]) == 2
    assert "give MODEL" in capsys.readouterr().err
    assert main(["bench-serve", "x", "--prefill-tokens", "1"]) == 2
    assert "--prefill-tokens >= 2" in capsys.readouterr().err


def test_step_bound_counts_static_batches_to_their_longest_and_continuous_slots_filled():
    def load(lengths):
        return [serve_load.LoadRequest(0.0, "p", n, None) for n in lengths]

    b = serve_load.step_bound(load([10, 2, 2, 2, 8, 1]), max_batch=2)
    assert b["static_decode_steps"] == 10 + 2 + 8                      # batches (10, 2), (2, 2), (8, 1)
    assert b["continuous_min_decode_steps"] == 13                      # 25 tokens over 2 slots, rounded up
    assert b["continuous_over_static_at_most"] == pytest.approx(20 / 13)
    one_long = serve_load.step_bound(load([100, 1, 1, 1]), max_batch=4)   # the longest answer bounds both
    assert one_long["continuous_min_decode_steps"] == 100 and one_long["continuous_over_static_at_most"] == 1.0


def test_bench_serve_all_at_once_reports_what_the_answer_lengths_allow(tmp_path, capsys):
    out = tmp_path / "bs0"
    assert main(["bench-serve", str(ASSET), "--requests", "5", "--rate", "0", "--max-tokens", "2:9",
                 "--prompt-words", "2:6", "--max-batch", "2", "--out", str(out), "--device", "cpu",
                 "--dtype", "float32", "--warmup", "0", "--scheduler", "continuous,overlap",
                 "--answer-lengths", "log-uniform"]) == 0
    rec = json.loads((out / "bench-serve.json").read_text())
    assert rec["answer_lengths"] == "log-uniform"
    for name in ("continuous", "overlap"):               # overlap: continuous with --overlap-prefill
        assert rec["summaries"][name]["failed"] == 0 and rec["summaries"][name]["short_answers"] == 0
    lengths = [w["max_tokens"] for w in rec["workload"]]
    want = serve_load.step_bound([serve_load.LoadRequest(0.0, "", n) for n in lengths], 2)
    assert rec["step_bound"] == want and want["static_decode_steps"] >= want["continuous_min_decode_steps"]
    assert f"static batching needs {want['static_decode_steps']} decode steps" in capsys.readouterr().out
