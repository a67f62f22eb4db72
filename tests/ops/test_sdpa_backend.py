"""Prefill, the vision tower and scoring never run sdpa on cuDNN's backend, which builds a graph per new shape
(distillation keeps it and pads its batches to few lengths instead: tests/distill/test_train.py).

The flag sdpa reads is process-wide and device-independent, so what each path runs under is observed on CPU
by the `sdpa_spy` fixture (tests/conftest.py), a torch-function mode that sees every
`F.scaled_dot_product_attention` call (transformers' sdpa layers and the vision tower make them).
"""

import pytest
import torch

import matvlm
from matvlm.convert.pipeline import convert
from matvlm.ops.attention import sdpa_without_cudnn


@pytest.mark.parametrize("outer", [True, False])
def test_the_context_restores_the_callers_setting_even_on_error(outer):
    torch.backends.cuda.enable_cudnn_sdp(outer)
    try:
        with pytest.raises(RuntimeError), sdpa_without_cudnn():
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            raise RuntimeError("boom")
        assert torch.backends.cuda.cudnn_sdp_enabled() is outer
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_engine_prefill_vision_tower_and_continuous_prefill_run_without_cudnn(teacher_dirs, tmp_path, image, sdpa_spy):
    from matvlm.engine.engine import Engine, Request
    from matvlm.engine.sampling import SamplingParams
    from matvlm.engine.scheduler import ContinuousBatcher, Sequence
    from matvlm.inputs.prompts import render

    hybrid = convert(teacher_dirs["qwen2"], tmp_path / "h", mamba_ratio=0.5)
    eng = Engine.from_dir(hybrid, device="cpu", dtype="float32")
    prompt = render(eng.processor, eng.model.config, [{"role": "user", "content": "What is this?"}], 1)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    eng._decode_forward = sdpa_spy.around(eng._decode_forward)
    eng.generate([Request(prompt, [image], params)])
    n_static = len(sdpa_spy.seen)
    b = ContinuousBatcher(eng, slots=2, length=256, prefill_tokens=8)      # prompts prefill in several chunks
    b._step_body = sdpa_spy.around(b._step_body)
    done = []
    b.add(Sequence(Request(prompt, [image], params), emit=lambda t: None, finish=lambda o, e: done.append((o, e))))
    while b.busy:
        b.step()
    assert done and done[0][1] is None
    assert n_static > 0 and len(sdpa_spy.seen) > n_static
    assert not any(sdpa_spy.seen)


def test_text_scoring_runs_without_cudnn(teacher_dirs, sdpa_spy):
    from matvlm.lm.evaluate import score_text

    d = teacher_dirs["causal-llama"]
    ids = torch.randint(3, 100, (2, 12))

    class Rows(list):
        pad_token_id = 0

    rows = Rows({"id": str(i), "input_ids": ids[i, :n], "labels": ids[i, :n]} for i, n in ((0, 12), (1, 9)))
    score_text({"teacher": matvlm.load(d), "student": matvlm.load(d)}, rows, batch_size=2, progress=False)
    assert sdpa_spy.seen and not any(sdpa_spy.seen)


def test_overlapping_contexts_in_two_threads_keep_cudnn_off_until_both_leave():
    import threading

    inside, release = threading.Event(), threading.Event()
    seen = []

    def worker():
        with sdpa_without_cudnn():
            inside.set()
            release.wait(5)
            seen.append(torch.backends.cuda.cudnn_sdp_enabled())

    t = threading.Thread(target=worker)
    with sdpa_without_cudnn():
        t.start()
        assert inside.wait(5)
    assert not torch.backends.cuda.cudnn_sdp_enabled()          # the worker is still inside
    release.set()
    t.join(5)
    assert seen == [False] and torch.backends.cuda.cudnn_sdp_enabled()
