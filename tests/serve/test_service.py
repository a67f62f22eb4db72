"""The serving core under load: failures stay with their request, continuous batching lets newcomers
finish early, the queue is bounded, cancelled requests free their slot, /metrics reports it all."""

import threading
import time

import httpx
import pytest

import matvlm
from matvlm.engine.engine import Engine, Request
from matvlm.inputs.prompts import render
from matvlm.engine.sampling import SamplingParams
from matvlm.errors import MatvlmError
from matvlm.serve.service import BatchingService, ContinuousService, QueueFull
from matvlm.toy.demo import ASSET


@pytest.fixture(scope="module")
def engine():
    return Engine(matvlm.load(ASSET, dtype="float32"), matvlm.load_processor(ASSET), device="cpu")


def ask(engine, text, n, **kw):
    prompt = render(engine.processor, engine.model.config, [{"role": "user", "content": text}])
    return Request(prompt, [], SamplingParams(max_new_tokens=n, ignore_eos=True, **kw))


class BrokenImage:
    def convert(self, mode):
        raise OSError("this image is broken")


SERVICES = {"static": lambda e, **kw: BatchingService(e, window_s=0.3, **kw), "continuous": ContinuousService,
            "overlap": lambda e, **kw: ContinuousService(e, overlap_prefill=True, **kw)}


@pytest.mark.parametrize("kind", SERVICES)
def test_a_request_whose_prompt_image_or_generation_fails_gets_its_own_error_and_the_others_finish(engine, kind):
    service = SERVICES[kind](engine, max_batch=8)
    good = [ask(engine, "How many shapes are there?", 6), ask(engine, "What color is the circle?", 9)]
    bad_tokens = Request([5, 10 ** 7, 6], [], SamplingParams(max_new_tokens=4))     # fails in the model's forward
    bad_image = Request(good[0].prompt.replace("USER: ", "USER: <image>\n"), [BrokenImage()], good[0].params)
    handles = [service.submit(r) for r in (good[0], bad_tokens, bad_image, good[1])]
    with pytest.raises(IndexError):
        handles[1].result()
    with pytest.raises(OSError, match="this image is broken"):
        handles[2].result()
    alone = engine.generate(good)
    assert [handles[0].result().token_ids, handles[3].result().token_ids] == [o.token_ids for o in alone]


@pytest.mark.parametrize("kind", SERVICES)
def test_a_short_request_submitted_later_finishes_first_while_a_long_answer_streams(engine, kind):
    """Continuous batching lets the short request in at the next decode step; static batching makes it wait
    for the long answer's batch to end (the contrast shows what the test tells apart)."""
    service = SERVICES[kind](engine, max_batch=4)
    long = service.submit(ask(engine, "Describe the image.", 300))
    stream = long.stream()
    next(stream)                                     # the long answer is streaming
    short = service.submit(ask(engine, "What color is the circle?", 4))
    ended = {}
    threading.Thread(target=lambda: (short.result(), ended.setdefault("short", time.perf_counter()))).start()
    streamed = sum(1 for _ in stream)
    ended["long"] = time.perf_counter()
    for _ in range(100):
        if "short" in ended:
            break
        time.sleep(0.05)
    assert len(long.output.token_ids) == 300 and len(short.result().token_ids) == 4
    if kind != "static":
        assert ended["short"] < ended["long"], ended
        assert streamed > 100                        # and the long stream kept flowing
    else:
        assert ended["short"] > ended["long"], ended


def test_the_queue_is_bounded_and_a_full_server_answers_429_with_retry_after(engine):
    from fastapi.testclient import TestClient

    from matvlm.serve.openai_api import create_app

    service = ContinuousService(engine, max_batch=1, max_waiting=1)
    long = service.submit(ask(engine, "Describe the image.", 400))
    next(long.stream())                              # it holds the only slot
    waiting = service.submit(ask(engine, "Describe the image.", 2))
    with pytest.raises(QueueFull, match="1 requests are waiting already"):
        service.submit(ask(engine, "Describe the image.", 2))
    r = TestClient(create_app(service, "toy")).post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 429 and r.headers["retry-after"] == "1", r.text
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    long.cancel()
    assert len(waiting.result().token_ids) == 2


def test_a_cancelled_request_frees_its_slot_for_the_next(engine):
    service = ContinuousService(engine, max_batch=1)
    long = service.submit(ask(engine, "Describe the image.", 400))
    next(long.stream())
    long.cancel()
    t0 = time.perf_counter()
    assert len(service.submit(ask(engine, "What color is the circle?", 3)).result().token_ids) == 3
    assert time.perf_counter() - t0 < 5
    with pytest.raises(MatvlmError, match="cancelled"):
        long.result()


def test_seeded_sampling_gives_the_same_answer_alone_and_batched(engine):
    service = ContinuousService(engine, max_batch=4)
    reqs = [ask(engine, q, 12, temperature=1.5, seed=s) for q, s in
            (("Describe the image.", 1), ("How many shapes are there?", 2), ("What color is the circle?", 3))]
    alone = [service.submit(r).result().token_ids for r in reqs]
    together = [h.result().token_ids for h in [service.submit(r) for r in reqs]]
    assert together == alone


@pytest.fixture(scope="module")
def server(engine):
    from matvlm.serve.openai_api import create_app, serving

    service = ContinuousService(engine, max_batch=2)
    with serving(create_app(service, "toy")) as base:
        yield base, service


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    url, service = server
    body = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(5)) if line.startswith("data:")) >= 2
        assert service.counts()[0] == 1
    for _ in range(100):                             # the client is gone: its slot frees within a step or two
        if service.counts() == (0, 0):
            break
        time.sleep(0.05)
    assert service.counts() == (0, 0)
    assert service.batcher.steps < 300               # it did not run to its 400 tokens


def test_waiting_and_streaming_hold_no_worker_thread(server, monkeypatch):
    # a request waiting in the queue or between two pieces of its stream must not hold one of the event
    # loop's worker threads (40 by default): with more requests than that, streams would stall for threads
    from matvlm.serve import openai_api

    handed = []
    real = openai_api.run_in_threadpool

    def spy(fn, *args, **kw):
        handed.append(getattr(fn, "__name__", repr(fn)))
        return real(fn, *args, **kw)

    monkeypatch.setattr(openai_api, "run_in_threadpool", spy)
    url, _ = server
    body = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 12, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=60) as r:
        pieces = [line for line in r.iter_lines() if line.startswith("data: {") and '"content": "' in line]
    plain = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    assert len(pieces) >= 2 and plain["usage"]["completion_tokens"] == 12
    assert handed == ["prepare", "prepare"]          # only each request's CPU preparation went to a thread


def test_requests_are_encoded_once_off_the_event_loop_with_a_copy_of_the_tokenizer(server, monkeypatch):
    # the engine's thread decodes with its tokenizer while requests are prepared on worker threads: a fast
    # tokenizer shared between them raises "Already borrowed", so preparation encodes with its own copy
    url, service = server
    engine, calls = service.engine, []
    real = type(engine).encode

    def spy(self, request, processor=None):
        calls.append((request.encoded is not None, processor))
        return real(self, request, processor)

    monkeypatch.setattr(type(engine), "encode", spy)
    body = {"messages": [{"role": "user", "content": "Describe the image."}], "max_tokens": 3}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    encoded = [proc for cached, proc in calls if not cached]
    assert len(encoded) == 1 and encoded[0] is not None and encoded[0] is not engine.processor
    own = getattr(encoded[0], "tokenizer", encoded[0])
    assert own is not engine.tokenizer and own.vocab == engine.tokenizer.vocab
    assert len(calls) >= 2 and all(cached for cached, _ in calls[1:])   # the worker reused the encoding


def test_async_readers_get_every_piece_in_order_and_a_waiting_result_is_cancelled_when_its_client_goes():
    import asyncio

    from matvlm.engine.engine import Output
    from matvlm.serve.service import Handle

    handle = Handle(Request("p"))

    def produce():
        for text in ("a", "ab", "ab\ufffd", "abc", "abcd"):
            time.sleep(0.01)
            handle.put_text(text)
        handle.finish(Output("abcde", [1, 2, 3, 4, 5], "length", 1, {}), None)

    async def read():
        threading.Thread(target=produce).start()
        return [piece async for piece in handle.astream()], await handle.aresult()

    pieces, out = asyncio.run(read())
    assert pieces == ["a", "b", "c", "d", "e"] and out.text == "abcde"

    waiting = Handle(Request("p"))
    polls = []

    async def gone():
        polls.append(1)
        if len(polls) == 2:                             # the client goes away; the worker then ends it
            threading.Timer(0.02, waiting.finish, (None, MatvlmError("request cancelled"))).start()
        return len(polls) >= 2

    with pytest.raises(MatvlmError, match="cancelled"):
        asyncio.run(waiting.aresult(gone, poll_s=0.02))
    assert waiting.cancelled

    # a running answer's tokens keep waking the reader: its client is still polled every poll_s
    running, sent = Handle(Request("p")), []

    def decode():
        while not running.cancelled and len(sent) < 2000:
            sent.append(1)
            running.put_text("x" * len(sent))
            time.sleep(0.002)
        running.finish(None, MatvlmError("request cancelled"))

    async def client_gone():
        return True

    async def wait_running():
        threading.Thread(target=decode).start()
        return await running.aresult(client_gone, poll_s=0.05)

    with pytest.raises(MatvlmError, match="cancelled"):
        asyncio.run(wait_running())
    assert running.cancelled and len(sent) < 500          # cancelled at the first poll, not at the answer's end


def test_metrics_are_prometheus_text_with_running_waiting_and_histograms(server):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 5, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    m = httpx.get(url + "/metrics", timeout=10)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in m.text.splitlines()
              if line and not line.startswith("#")}
    lab = '{scheduler="continuous"}'
    assert values[f"matvlm_requests_running{lab}"] == 0 and values[f"matvlm_requests_waiting{lab}"] == 0
    assert values[f"matvlm_time_to_first_token_seconds_count{lab}"] >= 1
    assert values['matvlm_time_to_first_token_seconds_bucket{scheduler="continuous",le="+Inf"}'] >= 1
    assert values[f"matvlm_request_decode_tokens_per_second_count{lab}"] >= 1
    assert values[f"matvlm_generated_tokens_total{lab}"] >= 5
    assert "# TYPE matvlm_time_to_first_token_seconds histogram" in m.text


@pytest.mark.parametrize("scheduler,kind", [(None, ContinuousService), ("static", BatchingService)])
def test_matvlm_serve_batches_continuously_unless_told_static(monkeypatch, scheduler, kind):
    import uvicorn

    from matvlm import commands

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    monkeypatch.setattr("matvlm.serve.openai_api.create_app", lambda service, *a, **kw: seen.setdefault("s", service))
    commands.serve(str(ASSET), device="cpu", dtype="float32", max_batch=3, prefill_tokens=64,
                   **({"scheduler": scheduler} if scheduler else {}))
    assert type(seen["s"]) is kind and seen["s"].max_batch == 3 and seen["host"] == "127.0.0.1"
    if kind is ContinuousService:
        assert seen["s"].batcher.prefill_tokens == 64
    with pytest.raises(MatvlmError, match="--max-waiting must be >= 1"):
        commands.serve(str(ASSET), device="cpu", max_waiting=0)
    with pytest.raises(MatvlmError, match="--prefill-tokens >= 2"):
        commands.serve(str(ASSET), device="cpu", prefill_tokens=1)


@pytest.mark.parametrize("kind", SERVICES)
def test_close_answers_what_the_worker_holds_then_ends_it(engine, kind):
    service = SERVICES[kind](engine, max_batch=2)
    held = service.submit(ask(engine, "Describe the image.", 20))
    next(held.stream())
    service.close()
    assert not service.thread.is_alive() and len(held.result(timeout=0).token_ids) == 20


def test_a_decode_step_that_cannot_be_captured_runs_eagerly_with_the_same_tokens(engine, monkeypatch, caplog):
    reqs = [ask(engine, "Describe the image.", 10), ask(engine, "What color is the circle?", 6)]
    eager = [o.token_ids for o in engine.generate(reqs)]
    service = ContinuousService(engine, max_batch=2)
    monkeypatch.setattr(engine, "cuda_graphs", True)            # as on CUDA; the capture fails here
    monkeypatch.setattr(service.batcher, "_capture", lambda *a: (_ for _ in ()).throw(RuntimeError("no graphs")))
    with caplog.at_level("WARNING", logger="matvlm.engine"):
        assert [h.result().token_ids for h in [service.submit(r) for r in reqs]] == eager
    assert "runs eagerly" in caplog.text and service.batcher._eager
    service.close()


def test_slots_are_sized_to_the_free_memory_and_a_max_len_that_cannot_fit_is_refused(engine, monkeypatch, caplog):
    from matvlm.engine import scheduler

    tc = engine.model.config.text_config
    n_attn = tc.num_hidden_layers - len(engine.model.hybrid_config.mamba_layers)
    per_token = 2 * n_attn * tc.num_key_value_heads * (tc.hidden_size // tc.num_attention_heads) * 4   # K+V, fp32
    assert scheduler.slot_bytes_per_token(engine) == per_token
    monkeypatch.setattr(scheduler, "free_memory", lambda device: None)          # unknown: the model's context
    assert scheduler.slot_length(engine, 4) == 512 and scheduler.slot_length(engine, 4, 300) == 300
    # room for 300 tokens in each of 4 slots + the staging row, within the usable 85 %
    monkeypatch.setattr(scheduler, "free_memory", lambda device: int(300 * 5 * per_token / 0.85) + 1)
    with caplog.at_level("WARNING", logger="matvlm.engine"):
        assert scheduler.slot_length(engine, 4) == 256             # capped, rounded down to 256
    assert "slots hold 256 tokens each (the model's context is 512)" in caplog.text
    assert scheduler.slot_length(engine, 4, 300) == 300
    with pytest.raises(MatvlmError, match=r"--max-len 400 for 4 slots needs .* GiB of KV cache .* lower --max-len"):
        scheduler.slot_length(engine, 4, 400)
    with pytest.raises(MatvlmError, match="64 slots do not fit in memory"):
        scheduler.slot_length(engine, 64)
    service = ContinuousService(engine, max_batch=4)
    assert service.batcher.pool.length == 256 and service.batcher.pool.kv[1][0].shape[2] == 256
    long = service.submit(ask(engine, "Describe the image.", 250))           # 64 image tokens + prompt + 250 > 256
    with pytest.raises(MatvlmError, match="exceeds the 256 tokens a slot holds"):
        long.result(timeout=60)
    assert len(service.submit(ask(engine, "Describe the image.", 5)).result(timeout=60).token_ids) == 5
    from fastapi.testclient import TestClient

    from matvlm.serve.openai_api import create_app

    r = TestClient(create_app(service, "toy")).post(          # the server checks a slot's size up front: 400
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Describe the image."}],
                                      "max_tokens": 250})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "exceeds the 256 tokens a request may hold on this server" in r.json()["error"]["message"]
    service.close()


def test_a_decode_step_reads_only_the_kv_entries_its_requests_hold_not_the_whole_slot(engine):
    reqs = [ask(engine, "Describe the image.", 12), ask(engine, "What color is the circle?", 8)]
    expected = [o.token_ids for o in engine.generate(reqs)]
    service = ContinuousService(engine, max_batch=2)
    pool = service.batcher.pool
    assert pool.length == 512
    for k, v in pool.kv.values():           # NaN past the 256-position bucket: read, it would poison every row
        k[:, :, 256:] = float("nan")
        v[:, :, 256:] = float("nan")
    assert [h.result(timeout=60).token_ids for h in [service.submit(r) for r in reqs]] == expected
    assert {length for _, length in service.batcher._caches} == {256}
    service.close()


def test_warm_up_runs_a_dummy_request_and_every_slot_bucket_before_serving_and_leaves_no_trace(engine, monkeypatch):
    reqs = [ask(engine, "Describe the image.", 9), ask(engine, "What color is the circle?", 5)]
    expected = [o.token_ids for o in engine.generate(reqs)]
    launched = []
    from matvlm.engine.scheduler import ContinuousBatcher

    real = ContinuousBatcher._launch
    monkeypatch.setattr(ContinuousBatcher, "_launch", lambda self, k, n: (launched.append((k, n)), real(self, k, n)))
    calls = _spy_prefills(monkeypatch)
    service = ContinuousService(engine, max_batch=6)
    assert service.warm_up_s is not None and service.batcher.steps == 0
    assert len(calls["chunk"]) == 1 and [b for b, _ in calls["group"]] == [2]     # alone, then a padded group
    assert {(6, 256), (4, 256), (3, 256), (2, 256), (1, 256)} <= set(launched)   # every bucket of 6 slots
    assert service.batcher.free == list(range(6)) and not service.batcher.busy
    assert (service.batcher.pool.position == 0).all()
    assert [h.result(timeout=60).token_ids for h in [service.submit(r) for r in reqs]] == expected
    service.close()
    cold = ContinuousService(engine, max_batch=2, warm_up=False)
    assert cold.warm_up_s is None
    cold.close()


def test_with_cuda_graphs_the_warm_up_captures_every_slot_and_length_bucket(engine, monkeypatch):
    """A capture mid-serving stops every stream while it runs, so the warm-up makes them all up front."""
    from types import SimpleNamespace

    from matvlm.engine.scheduler import ContinuousBatcher

    captured, req = [], ask(engine, "What color is the circle?", 5)
    alone = engine.generate([req])[0].token_ids

    def fake_capture(self, k, n):                        # CPU: a "graph" that replays the eager step
        captured.append((k, n))
        self._graphs[k, n] = SimpleNamespace(replay=lambda: self._step_body(k, n))

    monkeypatch.setattr(engine, "cuda_graphs", True)
    monkeypatch.setattr(ContinuousBatcher, "_capture", fake_capture)
    batcher = ContinuousBatcher(engine, slots=3, length=512)             # the toy's context
    batcher.warm_up()
    assert sorted(captured) == sorted((k, n) for k in (1, 2, 3) for n in (256, 512))
    assert _run_batcher(batcher, [req]) == [alone]
    assert len(captured) == 6                            # serving captured nothing more
    import matvlm.engine.scheduler as scheduler

    captured.clear()
    monkeypatch.setattr(scheduler, "WARM_UP_CAPTURES", 5)      # more graphs than that: the shortest length only
    ContinuousBatcher(engine, slots=3, length=512).warm_up()
    assert sorted(captured) == [(1, 256), (2, 256), (3, 256)]


def test_a_warm_up_that_cannot_run_its_dummy_request_is_logged_and_serving_goes_on(engine, caplog):
    with caplog.at_level("WARNING", logger="matvlm.engine"):
        service = ContinuousService(engine, max_batch=2, max_len=40)        # 64 image tokens do not fit a slot
    assert "warm-up request failed" in caplog.text and "exceeds the 40 tokens a slot holds" in caplog.text
    short = Request(render(engine.processor, engine.model.config, [{"role": "user", "content": "Hi"}]), [],
                    SamplingParams(max_new_tokens=3, ignore_eos=True))
    assert len(service.submit(short).result(timeout=60).token_ids) == 3
    service.close()


def test_the_fused_decode_step_serves_each_slot_at_its_own_position(engine):
    """Requests of different prompt lengths decode side by side, each slot writing and attending at its
    own position, through the engine's fused step: the same greedy tokens as the model's own layers
    give each request alone, and nothing past the step's length bucket is read."""
    fused = Engine(matvlm.load(ASSET, dtype="float32"), matvlm.load_processor(ASSET), device="cpu", fuse=True)
    assert fused.fused is not None
    reqs = [ask(engine, "Describe the image.", 14), ask(engine, "What color is the circle?", 6),
            ask(engine, "How many shapes are in the image? Answer with one number, please.", 9)]
    expected = [engine.generate([r])[0].token_ids for r in reqs]
    service = ContinuousService(fused, max_batch=3)
    for k, v in service.batcher.pool.kv.values():
        k[:, :, 256:] = float("nan")
        v[:, :, 256:] = float("nan")
    handles = [service.submit(r) for r in reqs]
    assert [h.result(timeout=60).token_ids for h in handles] == expected
    views = service.batcher._caches
    assert views and all(not hasattr(v, "get_seq_length") for v in views.values())   # the fused step's views
    service.close()


def test_every_step_of_slots_side_by_side_gives_the_logits_of_a_full_forward(engine, monkeypatch):
    """Greedy tokens are a weak test of a batch (on a small random-weight model, slots attending one position
    too far kept every greedy token while moving the logits by up to 7e-4): here every step's logits, of three
    requests of different lengths sharing the fused step's slots, equal the model's own full forward over each
    request's prompt and answer within float32 rounding (that fault moves them by 8-42 % here)."""
    import torch

    from matvlm.bench.speed import reference_logits
    from matvlm.engine import scheduler

    fused = Engine(matvlm.load(ASSET, dtype="float32"), matvlm.load_processor(ASSET), device="cpu", fuse=True)
    reqs = [ask(engine, "Describe the image.", 12), ask(engine, "What color is the circle?", 5),
            ask(engine, "How many shapes are in the image? Answer with one number, please.", 8)]
    batcher = scheduler.ContinuousBatcher(fused, slots=3, length=256)
    logits, got, index = {}, {}, {}
    choose, launch = batcher._sample, batcher._launch

    def recording_choose(step_logits, seqs):            # the prefill's logits, where a first token is chosen
        for row, seq in zip(step_logits, seqs):
            logits.setdefault(index[id(seq)], []).append(row.clone())
        return choose(step_logits, seqs)

    def recording_launch(k, length):                     # each greedy step's, as it is queued (one ahead)
        launch(k, length)
        for row, seq in batcher.running.items():
            logits.setdefault(index[id(seq)], []).append(batcher.pool.logits[row].clone())

    monkeypatch.setattr(batcher, "_sample", recording_choose)
    monkeypatch.setattr(batcher, "_launch", recording_launch)
    for i, r in enumerate(reqs):
        seq = scheduler.Sequence(r, emit=lambda t: None, finish=lambda o, e, i=i: got.__setitem__(i, o or e))
        index[id(seq)] = i
        batcher.add(seq)
    while batcher.busy:
        batcher.step()
        assert batcher.n_running <= 3
    for i, r in enumerate(reqs):
        prompt = engine.encode(r)[0]
        tokens = got[i].token_ids
        ref = reference_logits(engine.model, prompt, tokens)
        mine = torch.stack(logits[i])[:len(tokens)]     # (a finished answer's spare step is dropped)
        assert mine.shape == ref.shape == (r.params.max_new_tokens, ref.shape[-1])
        assert ((mine - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1e-5, i


def test_greedy_steps_run_one_ahead_of_the_host_and_sampled_requests_join_them_unchanged(engine):
    """Greedy batches queue step N+1 before taking step N's tokens: a lone answer of 6 tokens (the first
    from prefill) takes 6 decode steps, the last a spare one nobody reads. A seeded sampled request that
    joins a running greedy one switches the batch to host sampling; both answers stay what they are alone."""
    from matvlm.engine.scheduler import ContinuousBatcher, Sequence

    def run(batcher, reqs, at_step=None):
        got = {}
        for i, r in enumerate(reqs):
            if at_step is None or i == 0:
                batcher.add(Sequence(r, emit=lambda t: None, finish=lambda o, e, i=i: got.__setitem__(i, o or e)))
        while batcher.busy:
            batcher.step()
            if at_step is not None and batcher.steps == at_step and len(reqs) > 1 and 1 not in got:
                batcher.add(Sequence(reqs[1], emit=lambda t: None, finish=lambda o, e: got.__setitem__(1, o or e)))
                at_step = -1
        return [got[i].token_ids for i in range(len(reqs))]

    batcher = ContinuousBatcher(engine, slots=2, length=256)
    assert run(batcher, [ask(engine, "What color is the circle?", 6)]) == \
        [engine.generate([ask(engine, "What color is the circle?", 6)])[0].token_ids]
    assert batcher.steps == 6
    greedy, sampled = ask(engine, "Describe the image.", 30), ask(engine, "How many shapes?", 12, temperature=1.5, seed=7)
    alone = [run(ContinuousBatcher(engine, slots=2, length=256), [r])[0] for r in (greedy, sampled)]
    assert run(ContinuousBatcher(engine, slots=2, length=256), [greedy, sampled], at_step=5) == alone


def test_a_random_mix_of_greedy_sampled_stopped_and_cancelled_requests_keeps_every_answer(engine):
    """Requests join at random steps into 3 slots, greedy and seeded sampled mixed (the batch switches
    between running a step ahead and sampling on the host), some with stop strings, one cancelled midway:
    every answer is the one the request gets alone, and the cancelled one ends with its error."""
    import random

    from matvlm.engine.scheduler import ContinuousBatcher, Sequence

    rng = random.Random(5)
    questions = ["Describe the image.", "What color is the circle?", "How many shapes are there?",
                 "Where is the square?", "Is there a triangle?"]
    reqs = []
    for i in range(9):
        kw = {"temperature": 1.3, "seed": 100 + i} if i % 3 == 1 else {}
        if i % 4 == 2:
            kw["stop"] = ["e"]
        reqs.append(ask(engine, rng.choice(questions), rng.randrange(2, 20), **kw))
    reqs[4] = ask(engine, "Describe the image.", 40)                 # still running when it is cancelled
    alone = []
    for r in reqs:
        b = ContinuousBatcher(engine, slots=3, length=256)
        got = []
        b.add(Sequence(r, emit=lambda t: None, finish=lambda o, e: got.append(o)))
        while b.busy:
            b.step()
        alone.append((got[0].token_ids, got[0].text))
    batcher = ContinuousBatcher(engine, slots=3, length=256)
    results, cancelled = {}, {"flag": False}
    joins = sorted(rng.sample(range(0, 30), len(reqs)))
    pending = list(zip(joins, range(len(reqs))))
    step = 0
    while pending or batcher.busy:
        while pending and pending[0][0] <= step:
            _, i = pending.pop(0)
            batcher.add(Sequence(reqs[i], emit=lambda t: None,
                                 cancelled=(lambda: cancelled["flag"]) if i == 4 else (lambda: False),
                                 finish=lambda o, e, i=i: results.__setitem__(i, (o, e))))
        if step == joins[4] + 3:
            cancelled["flag"] = True
        batcher.step()
        step += 1
    for i in range(len(reqs)):
        out, err = results[i]
        if i == 4:
            assert out is None and "cancelled" in str(err)
            continue
        assert err is None and (out.token_ids, out.text) == alone[i], i


def _run_batcher(batcher, reqs, steps_before=None):
    """Run `reqs` through `batcher` (all added at once, or request i at iteration steps_before[i]); their
    token ids, or the exception each got."""
    from matvlm.engine.scheduler import Sequence

    got, it = {}, 0
    todo = list(range(len(reqs)))
    while todo or batcher.busy:
        for i in [i for i in todo if steps_before is None or steps_before[i] <= it]:
            todo.remove(i)
            batcher.add(Sequence(reqs[i], emit=lambda t: None, finish=lambda o, e, i=i: got.__setitem__(i, o or e)))
        batcher.step()
        it += 1
    return [got[i].token_ids if not isinstance(got[i], BaseException) else got[i] for i in range(len(reqs))]


def _image_request(engine, text, n, **kw):
    from PIL import Image

    prompt = render(engine.processor, engine.model.config, [{"role": "user", "content": text}], 1)
    return Request(prompt, [Image.new("RGB", (40, 40), (200, 30, 30))], SamplingParams(max_new_tokens=n,
                                                                                       ignore_eos=True, **kw))


def _spy_prefills(monkeypatch):
    """Record (batch, width) of every group prefill and the budget of every chunked one."""
    from matvlm.engine.scheduler import ContinuousBatcher

    calls = {"group": [], "chunk": []}
    into, chunk = Engine.prefill_into, ContinuousBatcher._prefill_chunk
    monkeypatch.setattr(Engine, "prefill_into", lambda self, cache, enc, b, width: (
        calls["group"].append((b, width)), into(self, cache, enc, b, width))[1])
    monkeypatch.setattr(ContinuousBatcher, "_prefill_chunk", lambda self, seq, budget: (
        calls["chunk"].append(budget), chunk(self, seq, budget))[1])
    return calls


def test_new_requests_that_fit_the_budget_are_prefilled_in_one_forward_and_answer_as_they_do_alone(engine,
                                                                                                  monkeypatch):
    """Four requests arrive at once (prompts of different lengths, one with an image, one sampled with a
    seed): one left-padded forward prefills them all, and every answer is the one the request gets alone
    (where it is prefilled by itself in the staging row)."""
    from matvlm.engine.scheduler import ContinuousBatcher

    reqs = [ask(engine, "Describe the image.", 12), _image_request(engine, "What color is the circle?", 9),
            ask(engine, "How many shapes are there in this picture, and where is each of them?", 7),
            ask(engine, "Is there a triangle?", 10, temperature=1.4, seed=3)]
    alone = [_run_batcher(ContinuousBatcher(engine, slots=4, length=256), [r])[0] for r in reqs]
    calls = _spy_prefills(monkeypatch)
    together = _run_batcher(ContinuousBatcher(engine, slots=4, length=256), reqs)
    assert together == alone
    widths = [len(engine.encode(r)[0]) for r in reqs]
    assert calls == {"group": [(4, max(widths))], "chunk": []}
    assert len(set(widths)) == 4 and widths[1] > max(widths[0], widths[2], widths[3])   # left padding was tested


def test_while_streams_run_newcomers_are_prefilled_within_the_budget_and_a_long_prompt_in_chunks(engine,
                                                                                                 monkeypatch):
    """With a request decoding, at most `prefill_tokens` prompt tokens go between two decode steps: short
    newcomers that fit together share one forward, a prompt longer than the budget is prefilled alone in
    chunks; every answer is the one it gets alone."""
    from matvlm.engine.scheduler import ContinuousBatcher

    short = [ask(engine, "Is there a triangle?", 5), ask(engine, "What color is the circle?", 6)]
    width = max(len(engine.encode(r)[0]) for r in short)
    budget = 2 * width + 1
    long = ask(engine, "Describe the image. " * 12, 5)
    assert len(engine.encode(long)[0]) > 2 * budget
    reqs = [ask(engine, "Describe the image.", 40)] + short + [long]
    alone = [_run_batcher(ContinuousBatcher(engine, slots=4, length=512), [r])[0] for r in reqs]
    calls = _spy_prefills(monkeypatch)
    got = _run_batcher(ContinuousBatcher(engine, slots=4, length=512, prefill_tokens=budget), reqs,
                       steps_before=[0, 3, 3, 3])
    assert got == alone
    assert calls["group"] == [(2, width)]
    # the first request, alone with nobody running (one chunk), then the long one in budget-sized chunks
    assert len(calls["chunk"]) >= 4 and all(b <= budget for b in calls["chunk"][1:])


def test_a_group_whose_prefill_fails_is_prefilled_one_by_one_and_only_the_bad_request_gets_an_error(
        engine, monkeypatch, caplog):
    from matvlm.engine.scheduler import ContinuousBatcher

    good = [ask(engine, "How many shapes are there?", 6), _image_request(engine, "Where is the square?", 8)]
    bad = Request([5, 10 ** 7, 6], [], SamplingParams(max_new_tokens=4))      # fails in the model's forward
    alone = [_run_batcher(ContinuousBatcher(engine, slots=3, length=256), [r])[0] for r in good]
    calls = _spy_prefills(monkeypatch)
    with caplog.at_level("WARNING", logger="matvlm.engine"):
        got = _run_batcher(ContinuousBatcher(engine, slots=3, length=256), [good[0], bad, good[1]])
    assert [got[0], got[2]] == alone and isinstance(got[1], IndexError)
    assert calls["group"][0][0] == 3 and "prefilling them one by one" in caplog.text


def test_overlapped_prefill_runs_on_its_own_thread_and_answers_as_alone_with_failures_kept_apart(engine,
                                                                                                  monkeypatch):
    import threading as th

    from matvlm.engine.scheduler import ContinuousBatcher

    reqs = [ask(engine, "Describe the image.", 12), _image_request(engine, "What color is the circle?", 9),
            Request([5, 10 ** 7, 6], [], SamplingParams(max_new_tokens=4)),              # fails in the forward
            ask(engine, "Is there a triangle?", 10, temperature=1.4, seed=3)]
    alone = [_run_batcher(ContinuousBatcher(engine, slots=4, length=256), [r])[0] for r in reqs]
    threads = []
    into = Engine.prefill_into
    monkeypatch.setattr(Engine, "prefill_into", lambda self, *a: (threads.append(th.current_thread().name),
                                                                  into(self, *a))[1])
    batcher = ContinuousBatcher(engine, slots=4, length=256, overlap=True)
    assert {k.shape[0] for k, _ in batcher.pool.kv.values()} == {4}        # no staging row: prefills have their own
    got = _run_batcher(batcher, reqs, steps_before=[0, 2, 2, 2])
    batcher.close()
    assert [got[i] for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)] and isinstance(got[2], IndexError)
    assert isinstance(alone[2], IndexError)
    assert threads and all(t.startswith("matvlm-prefill") for t in threads)


@pytest.mark.parametrize("overlap", [False, True])
def test_with_overlapped_prefill_running_streams_go_on_decoding_while_a_newcomer_prefills(engine, monkeypatch,
                                                                                          overlap):
    """A newcomer's prefill is made slow (0.4 s): with `overlap` the running request takes decode steps
    meanwhile; without, it waits (the contrast shows what the test tells apart)."""
    from matvlm.engine.scheduler import ContinuousBatcher

    batcher = ContinuousBatcher(engine, slots=2, length=256, overlap=overlap)
    long, newcomer = ask(engine, "Is it?", 200), ask(engine, "Describe the image. " * 3, 4)
    n = len(engine.encode(newcomer)[0])
    assert len(engine.encode(long)[0]) < n
    forward, during = Engine._forward, []

    def slow(self, embeds, *a):
        if embeds.shape[1] == n:                         # the newcomer's prefill (one forward either way)
            before = batcher.steps
            time.sleep(0.4)
            during.append(batcher.steps - before)
        return forward(self, embeds, *a)

    monkeypatch.setattr(Engine, "_forward", slow)
    got = _run_batcher(batcher, [long, newcomer], steps_before=[0, 3])
    batcher.close()
    assert len(got[0]) == 200 and len(got[1]) == 4
    assert len(during) == 1 and (during[0] >= 3 if overlap else during[0] == 0), during


def test_a_request_cancelled_while_its_prefill_runs_beside_decoding_ends_cancelled_without_a_token(engine,
                                                                                                    monkeypatch):
    from matvlm.engine.scheduler import ContinuousBatcher, Sequence

    batcher = ContinuousBatcher(engine, slots=2, length=256, overlap=True)
    long, newcomer = ask(engine, "Is it?", 60), ask(engine, "Describe the image. " * 3, 4)
    n = len(engine.encode(newcomer)[0])
    forward, gone, counted = Engine._forward, {"flag": False}, []

    def slow(self, embeds, *a):
        if embeds.shape[1] == n:                         # the newcomer's prefill, on the prefill thread
            counted.append(batcher.n_running)            # as /metrics reads it, from another thread
            gone["flag"] = True                          # its client leaves meanwhile
            time.sleep(0.2)
        return forward(self, embeds, *a)

    monkeypatch.setattr(Engine, "_forward", slow)
    results, emitted = {}, []
    batcher.add(Sequence(long, emit=lambda t: None, finish=lambda o, e: results.__setitem__("long", o or e)))
    for _ in range(3):
        batcher.step()
    batcher.add(Sequence(newcomer, emit=emitted.append, cancelled=lambda: gone["flag"],
                         finish=lambda o, e: results.__setitem__("new", o or e)))
    while batcher.busy:
        batcher.step()
    batcher.close()
    assert isinstance(results["new"], MatvlmError) and "cancelled" in str(results["new"]) and emitted == []
    assert len(results["long"].token_ids) == 60 and counted == [2]
