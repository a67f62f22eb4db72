"""Distillation: the one-copy teacher path, teacher forcing, exactness of resume and of multi-process runs."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import matvlm
from matvlm.convert import convert
from matvlm.distill import train as train_mod
from matvlm.distill.config import DistillConfig
from matvlm.distill.model import DistillStep, build
from matvlm.distill.train import run
from matvlm.errors import MatvlmError
from matvlm.toy import shapes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    shapes.make_splits(root, n_train=48, n_test=8, seed=0, grid=2, image_size=32)
    return root / "train.json"


def cfg(teacher_dirs, data, out, **kw):
    base = dict(teacher=str(teacher_dirs["phi"]), data=str(data), out=str(out), mamba_ratio=0.5,
                global_batch_size=8, micro_batch_size=2, max_steps=4, save_every=2, template="plain",
                tensorboard=False, lr=1e-3)
    base.update(kw)
    return DistillConfig(**base)


def read_log(out):
    return [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]


def batch_of(teacher_dirs, data, n=2, family="phi"):
    from matvlm.inputs.data import LlavaJsonDataset, collate
    from matvlm.inputs.templates import get_template

    proc = matvlm.load_processor(teacher_dirs[family])
    ds = LlavaJsonDataset(data, None, proc, get_template("plain"), 256)
    b = collate([ds[i] for i in range(n)], proc.tokenizer.pad_token_id)
    return {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}


def losses_and_grads(step, batch):
    """One forward and backward of `step` on `batch`: its loss sums and the gradients it leaves."""
    step.zero_grad()
    out = step(**batch)
    (out["prob_sum"] + out["ce_sum"] + 0.1 * out["layer_sum"]).backward()
    grads = [p.grad.clone() for p in step.parameters() if p.grad is not None]
    return {k: v.detach() for k, v in out.items()}, grads


def test_layer_loss_is_teacher_forced(teacher_dirs, data):
    model, teacher, _ = build(teacher_dirs["phi"], mamba_ratio=0.5)          # Mamba layers 0 and 2
    step = DistillStep(model, teacher, 1.0, need_ce=True, need_layer=True, need_prob=True).double()
    b = batch_of(teacher_dirs, data)
    b["pixel_values"] = b["pixel_values"].double()
    with torch.no_grad():
        before = step(**b)
        model.mamba_mixers[0].out_proj.weight.mul_(3.0)                       # change the student's layer 0
        for p in model.model.multi_modal_projector.parameters():              # ... and its connector
            p.add_(0.5)
        after = step(**b)
    assert not torch.equal(before["layer_sq"][0], after["layer_sq"][0])       # layer 0's own term moves
    assert torch.equal(before["layer_sq"][1], after["layer_sq"][1])           # layer 2 sees the teacher's input
    assert not torch.equal(before["prob_sum"], after["prob_sum"])             # the student's logits did change


def test_padding_a_batch_to_a_multiple_changes_no_loss(teacher_dirs, data):
    """On CUDA the loop pads micro-batches to a multiple of CUDA_PAD_MULTIPLE (few lengths for cuDNN attention's
    per-shape graphs): the extra right padding must be invisible to every loss term and gradient."""
    from matvlm.distill.train import CUDA_PAD_MULTIPLE
    from matvlm.inputs.data import LlavaJsonDataset, collate
    from matvlm.inputs.templates import get_template

    model, teacher, _ = build(teacher_dirs["qwen2"], mamba_ratio=0.5)
    step = DistillStep(model, teacher, 2.0, need_ce=True, need_layer=True, need_prob=True).double()
    proc = matvlm.load_processor(teacher_dirs["qwen2"])
    ds = LlavaJsonDataset(data, None, proc, get_template("plain"), 256)
    items = [ds[i] for i in range(3)]
    results = []
    for multiple in (1, CUDA_PAD_MULTIPLE, 7 * CUDA_PAD_MULTIPLE):
        b = collate(items, proc.tokenizer.pad_token_id, multiple_of=multiple)
        assert b["input_ids"].shape[1] % multiple == 0
        b = {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        b["pixel_values"] = b["pixel_values"].double()
        results.append((b["input_ids"].shape[1], *losses_and_grads(step, b)))
    (t1, base, g1), *padded = results
    for t, out, grads in padded:
        assert t > t1
        for k in base:        # the loss sums are float32 (losses.py): summation order differs with the shape
            torch.testing.assert_close(out[k], base[k], rtol=1e-5, atol=1e-6)
        assert len(grads) == len(g1) > 0
        for a, b in zip(grads, g1):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_a_padded_batch_gives_each_row_what_it_gives_alone(teacher_dirs, data):
    """Both passes run without the mask (right padding is invisible to a causal model's real tokens): a batch's
    loss sums and gradients equal the sums over its rows, each run alone and unpadded. Left padding, which this
    would get wrong, is refused."""
    from matvlm.inputs.data import LlavaJsonDataset, collate
    from matvlm.inputs.templates import get_template

    model, teacher, _ = build(teacher_dirs["qwen2"], mamba_ratio=0.5)
    step = DistillStep(model, teacher, 2.0, need_ce=True, need_layer=True, need_prob=True).double()
    proc = matvlm.load_processor(teacher_dirs["qwen2"])
    ds = LlavaJsonDataset(data, None, proc, get_template("plain"), 256)
    items = [ds[i] for i in range(3)]
    assert len({len(x["input_ids"]) for x in items}) > 1                      # the batch holds padding

    def run_step(batch_items):
        b = collate(batch_items, proc.tokenizer.pad_token_id)
        b = {k: b[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
        b["pixel_values"] = b["pixel_values"].double()
        return losses_and_grads(step, b)

    batch, g_batch = run_step(items)
    alone = [run_step([x]) for x in items]
    for k in batch:
        torch.testing.assert_close(batch[k], sum(a[k] for a, _ in alone), rtol=1e-5, atol=1e-6)
    for j, g in enumerate(g_batch):
        torch.testing.assert_close(g, sum(ga[j] for _, ga in alone), rtol=1e-5, atol=1e-8)
    b = collate(items, proc.tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="right-padded"):
        step(b["input_ids"], b["attention_mask"].flip(1), b["labels"], b["pixel_values"].double())


@pytest.mark.parametrize("family", ["phi", "qwen2"])
def test_the_passes_make_no_mask_check_that_waits_for_the_device(teacher_dirs, data, family, monkeypatch):
    """transformers checks the position ids for packed sequences on every forward without a mask, a read that
    waits for the GPU. Under `causal_attention` neither pass makes it, the losses and gradients equal those of
    plain sdpa (which does), and the stack's attention setting comes back afterwards, also after an error."""
    from transformers import masking_utils

    from matvlm.distill import model as model_mod
    from matvlm.model.hybrid import decoder_stack

    model, teacher, _ = build(teacher_dirs[family], mamba_ratio=0.5)
    step = DistillStep(model, teacher, 2.0, need_ce=True, need_layer=True, need_prob=True).double()
    b = batch_of(teacher_dirs, data, n=3, family=family)
    b["pixel_values"] = b["pixel_values"].double()
    checks = []
    real_check = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda *a: checks.append(1) or real_check(*a))

    out, grads = losses_and_grads(step, b)
    assert checks == []
    assert decoder_stack(model).config._attn_implementation == "sdpa"
    monkeypatch.setattr(model_mod, "causal_attention", lambda stack, length: contextlib.nullcontext())
    ref, ref_grads = losses_and_grads(step, b)
    assert len(checks) == 2                                   # the plain passes do check: the spy sees them
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=0)
    assert len(grads) == len(ref_grads) > 0
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=0)
    monkeypatch.undo()
    stack = decoder_stack(model)
    for m in (b["attention_mask"], b["attention_mask"][:, None, None, :].bool()):   # refused, not dropped
        with pytest.raises(ValueError, match="without an attention mask"), \
                model_mod.causal_attention(stack, b["input_ids"].shape[1]):
            stack(input_ids=b["input_ids"], attention_mask=m)
    assert stack.config._attn_implementation == "sdpa"
    with torch.no_grad():                                     # and taken again after the scope
        stack(input_ids=b["input_ids"], attention_mask=b["attention_mask"])


def test_a_text_step_reads_nothing_back_from_the_device(teacher_dirs, monkeypatch):
    """Nothing in a text model's distillation step (both passes, the layer and KL losses, backward, clipping)
    reads a value back to the host, which on a GPU waits for the queued work. Recorded on the CPU as the
    operations that do it on CUDA: a tensor read as a Python number or bool, and ops whose output size
    depends on values (boolean indexing among them). Left out: the step's own right-padding check, which the
    loop makes on the host before the copy, and AdamW, whose step counts are host tensors (read on the CPU,
    never on the device). `.tolist()` and `.cpu()` dispatch nothing on the CPU: on a GPU,
    scripts/profile-distill-step.py counts every wait (host_waits)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from matvlm.distill import losses
    from matvlm.distill import model as model_mod

    reads_back = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_consecutive", "equal",
                  "is_nonzero", "repeat_interleave", "bincount", "histc"}

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            bool_index = name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])   # x[mask]: a nonzero
            if name in reads_back or bool_index:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    model, teacher, names = build(teacher_dirs["causal-llama"], mamba_ratio=0.5)
    step = DistillStep(model, teacher, 2.0, need_ce=True, need_layer=True, need_prob=True)
    params = [p for n, p in model.named_parameters() if n in set(names)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0                                            # right padding
    mask[2, 9:] = 0
    rows = losses.real_rows(mask)                                # as the loop finds them, on the host
    monkeypatch.setattr(model_mod, "require_right_padding", lambda m: None)
    for _ in range(2):                                           # the second step: after an update
        with Reads() as r:
            o = step(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), rows=rows)
            (o["prob_sum"] + o["ce_sum"] + 0.1 * o["layer_sum"]).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert r.seen == []
    assert torch.isfinite(o["prob_sum"]) and float(o["n_tokens"]) == mask.sum()


def test_only_stacks_that_mask_nothing_but_the_future_run_without_a_mask():
    """A sliding window shorter than the sequence, or another layer kind, needs the mask transformers builds."""
    from types import SimpleNamespace as C

    from matvlm.distill.model import causal_is_enough

    assert causal_is_enough(C(), 4096)                                                    # Llama, Phi
    assert causal_is_enough(C(sliding_window=None, layer_types=["full_attention"] * 4), 4096)   # Qwen2's default
    assert causal_is_enough(C(sliding_window=4096), 4096)                                 # Mistral, within its window
    assert not causal_is_enough(C(sliding_window=4096), 4097)
    assert not causal_is_enough(C(sliding_window=512, layer_types=["sliding_attention", "full_attention"]), 1024)
    assert causal_is_enough(C(sliding_window=512, layer_types=["sliding_attention", "full_attention"]), 512)
    assert not causal_is_enough(C(sliding_window=None, layer_types=["sliding_attention"]), 16)
    assert not causal_is_enough(C(layer_types=["full_attention", "chunked_attention"]), 16)


def test_the_loop_pads_to_the_multiple_on_cuda_only_and_only_batches_that_need_padding():
    from matvlm.distill.train import CUDA_PAD_MULTIPLE, loop_collate
    from matvlm.errors import MatvlmError
    from matvlm.inputs.data import collate

    def item(n):
        return {"id": str(n), "input_ids": torch.arange(1, n + 1), "labels": torch.arange(1, n + 1)}

    cuda, cpu = loop_collate(torch.device("cuda"), 0), loop_collate(torch.device("cpu"), 0)
    b = cuda([item(5), item(40)])
    assert b["input_ids"].shape == (2, 2 * CUDA_PAD_MULTIPLE) and b["attention_mask"].sum() == 45
    assert (b["labels"][:, 40:] == -100).all() and (b["labels"][1, :40] == torch.arange(1, 41)).all()
    assert cuda([item(40), item(40)])["input_ids"].shape == (2, 40)     # no padding needed: none added
    assert cpu([item(5), item(40)])["input_ids"].shape == (2, 40)
    with pytest.raises(MatvlmError, match="at least 1"):
        collate([item(3)], 0, multiple_of=0)


def test_one_copy_of_the_frozen_weights(teacher_dirs):
    teacher_model = matvlm.load(teacher_dirs["phi"])
    model, teacher, trainable = build(teacher_dirs["phi"], mamba_ratio=0.5)
    step = DistillStep(model, teacher, 1.0, True, True, True)
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in step.parameters()}
    n_mixer = sum(p.numel() for m in model.mamba_mixers.values() for p in m.parameters())
    n_connector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    # teacher weights once, plus the new mixers, plus one frozen copy of the (trainable) connector
    assert sum(storages.values()) == sum(p.numel() for p in teacher_model.parameters()) + n_mixer + n_connector
    shared = model.model.language_model.layers[1].mlp.fc1.weight
    with teacher.active():
        assert model.model.language_model.layers[1].mlp.fc1.weight is shared
        assert type(model.model.language_model.layers[0].self_attn).__name__ == "PhiAttention"
    assert type(model.model.language_model.layers[0].self_attn).__name__ == "Mamba2Mixer"
    assert all(n.startswith(("model.language_model.layers.0.self_attn", "model.language_model.layers.2.self_attn",
                             "model.multi_modal_projector")) for n in trainable)


def test_training_changes_only_trainable_weights_and_lowers_the_loss(teacher_dirs, data, tmp_path):
    out = run(cfg(teacher_dirs, data, tmp_path / "run", max_steps=12, save_every=12), progress=False)
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    assert log[-1]["loss"] < 0.85 * log[0]["loss"], [r["loss"] for r in log]
    for r in log:
        assert set(r) >= {"step", "loss", "loss_layer", "loss_prob", "loss_ce", "lr", "tokens_per_s"}
        assert 0 <= r["data_s"] < r["elapsed_s"]                # the wait for the step's micro-batches
    teacher = matvlm.load(teacher_dirs["phi"]).state_dict()
    student = matvlm.load(out)                                                  # a normal hybrid checkpoint
    assert student.hybrid_config.mamba_layers == [0, 2]
    s = student.state_dict()
    trained = ("layers.0.self_attn", "layers.2.self_attn", "multi_modal_projector")
    for k, v in teacher.items():
        if not any(t in k for t in trained):
            assert torch.equal(v, s[k]), k
    assert not torch.equal(teacher["model.multi_modal_projector.linear_1.weight"],
                           s["model.multi_modal_projector.linear_1.weight"])


def test_resume_reproduces_the_uninterrupted_run(teacher_dirs, data, tmp_path, monkeypatch):
    full = run(cfg(teacher_dirs, data, tmp_path / "full", max_steps=6, save_every=2), progress=False)
    real_forward, calls = DistillStep.forward, {"n": 0}

    def crash_in_step_4(self, **kw):
        calls["n"] += 1
        if calls["n"] > 3 * 4:                          # 4 micro-batches per step: die inside step 4
            raise KeyboardInterrupt
        return real_forward(self, **kw)

    monkeypatch.setattr(DistillStep, "forward", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(teacher_dirs, data, tmp_path / "cut", max_steps=6, save_every=2), progress=False)
    monkeypatch.setattr(DistillStep, "forward", real_forward)
    assert [r["step"] for r in read_log(tmp_path / "cut")] == [1, 2, 3]
    run(cfg(teacher_dirs, data, tmp_path / "cut", max_steps=6, save_every=2), resume=True, progress=False)
    a, b = read_log(full), read_log(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    sa, sb = matvlm.load(full).state_dict(), matvlm.load(tmp_path / "cut").state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_step_0(teacher_dirs, data, tmp_path, monkeypatch):
    """kill -9 before the first checkpoint leaves the config, a log line and the partial files of a checkpoint
    and of the final model; --resume starts over (same result as an uninterrupted run) and removes them."""
    full = run(cfg(teacher_dirs, data, tmp_path / "full", max_steps=3, save_every=2), progress=False)
    real_forward, calls = DistillStep.forward, {"n": 0}

    def crash_in_step_2(self, **kw):
        calls["n"] += 1
        if calls["n"] > 4:                               # 4 micro-batches per step: die inside step 2
            raise KeyboardInterrupt
        return real_forward(self, **kw)

    monkeypatch.setattr(DistillStep, "forward", crash_in_step_2)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(cfg(teacher_dirs, data, cut, max_steps=3, save_every=2), progress=False)
    monkeypatch.setattr(DistillStep, "forward", real_forward)
    assert not (cut / "checkpoints").exists() and [r["step"] for r in read_log(cut)] == [1]
    partial = cut / "checkpoints" / ".step-2.tmp-0123abcd"    # what a kill inside save_checkpoint leaves
    partial.mkdir(parents=True)
    (partial / "trainable.safetensors").write_bytes(b"\0" * 1000)
    (cut / ".final-89abcdef").mkdir()                         # ... and one inside save_final
    with open(cut / "log.jsonl", "a") as f:
        f.write('{"step": 2, "lo')                             # a line cut by the kill
    with pytest.raises(MatvlmError, match="not empty; pass --resume"):
        run(cfg(teacher_dirs, data, cut, max_steps=3, save_every=2), progress=False)
    run(cfg(teacher_dirs, data, cut, max_steps=3, save_every=2), resume=True, progress=False)
    assert not partial.exists() and not list(cut.glob(".final-*"))
    assert [r["step"] for r in read_log(cut)] == [1, 2, 3]
    assert [r["loss"] for r in read_log(full)] == [r["loss"] for r in read_log(cut)]
    sa, sb = matvlm.load(full).state_dict(), matvlm.load(cut).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_one_process_loss_curve(teacher_dirs, data, tmp_path):
    common = ["--teacher", str(teacher_dirs["phi"]), "--mamba-ratio", "0.5", "--data", str(data), "--max-steps", "3",
              "--global-batch-size", "8", "--micro-batch-size", "2", "--template", "plain", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "matvlm", "distill", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(free_port()), "-m", "matvlm", "distill", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        for k in ("loss", "loss_layer", "loss_prob", "loss_ce"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]), (k, ra[k], rb[k])


def test_mismatched_student_is_refused_before_any_compute(teacher_dirs, data, tmp_path):
    other = convert(teacher_dirs["llama"], tmp_path / "llama-hybrid", mamba_ratio=0.5)
    with pytest.raises(MatvlmError, match="does not match teacher .*model_type"):
        run(cfg(teacher_dirs, data, tmp_path / "o", student=str(other), mamba_ratio=None), progress=False)
    assert not (tmp_path / "o" / "log.jsonl").exists()


def test_student_from_another_base_with_same_shapes_is_refused(teacher_dirs, data, tmp_path):
    from matvlm.toy.tiny import save_teacher, tiny_llava

    m, p = tiny_llava("phi", n_layer=4, seed=99)                                # same shapes, other weights
    other = convert(save_teacher(m, p, tmp_path / "t2"), tmp_path / "h2", mamba_ratio=0.5)
    with pytest.raises(MatvlmError, match="differs from the teacher in frozen tensor"):
        run(cfg(teacher_dirs, data, tmp_path / "o", student=str(other), mamba_ratio=None), progress=False)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(teacher_dirs, data, tmp_path,
                                                                           monkeypatch):
    real = train_mod._mean_mode_loss

    def poisoned(o, c, n_tok, n_ans):
        loss = real(o, c, n_tok, n_ans)
        return loss * float("nan") if poisoned.calls > 8 else loss      # from step 3 on

    def counting(*a):
        poisoned.calls += 1
        return poisoned(*a)

    poisoned.calls = 0
    monkeypatch.setattr(train_mod, "_mean_mode_loss", counting)
    with pytest.raises(MatvlmError, match=r"non-finite loss .* at step 3; .*Last good checkpoint: .*step-2"):
        run(cfg(teacher_dirs, data, tmp_path / "nan", max_steps=4, save_every=2), progress=False)
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir()] == ["step-2"]


def test_recipe_file_with_flag_overrides(teacher_dirs, data, tmp_path, capsys):
    from matvlm.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"teacher: {teacher_dirs['phi']}\ndata: {data}\nmamba_ratio: 0.5\nglobal_batch_size: 8\n"
                      "micro_batch_size: 4\nmax_steps: 5\ntemplate: plain\ntensorboard: false\nalpha: 0.0\n")
    rc = main(["distill", "--config", str(recipe), "--max-steps", "2", "--out", str(tmp_path / "r")])
    assert rc == 0
    log = read_log(tmp_path / "r")
    assert len(log) == 2 and log[0]["loss_layer"] is None                      # alpha 0 from the file
    saved = json.loads((tmp_path / "r" / "distill_config.json").read_text())
    assert saved["max_steps"] == 2 and saved["micro_batch_size"] == 4
    recipe.write_text("teacher: x\nbogus_key: 1\n")
    rc = main(["distill", "--config", str(recipe)])
    assert rc == 2 and "unknown setting(s) bogus_key" in capsys.readouterr().err


def test_missing_images_are_counted_or_fatal_with_strict(teacher_dirs, data, tmp_path):
    from matvlm.inputs.data import LlavaJsonDataset
    from matvlm.inputs.templates import get_template

    root = shutil.copytree(data.parent, tmp_path / "d")
    recs = json.loads((root / "train.json").read_text())
    (root / recs[0]["image"]).unlink()
    proc = matvlm.load_processor(teacher_dirs["phi"])
    ds = LlavaJsonDataset(root / "train.json", None, proc, get_template("plain"), 256)
    assert ds.skipped_missing_images == 1 and len(ds) == len(recs) - 1
    with pytest.raises(MatvlmError, match=recs[0]["id"]):
        LlavaJsonDataset(root / "train.json", None, proc, get_template("plain"), 256, strict=True)


def test_gradient_checkpointing_gives_the_same_losses(teacher_dirs, data, tmp_path):
    plain = run(cfg(teacher_dirs, data, tmp_path / "plain", max_steps=2), progress=False)
    ckpt = run(cfg(teacher_dirs, data, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True), progress=False)
    for a, b in zip(read_log(plain), read_log(ckpt)):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


def test_resume_refuses_a_checkpoint_without_optimizer_state(teacher_dirs, data, tmp_path):
    """Checkpoints written under DeepSpeed ZeRO carry no optimizer state (it is sharded); resuming
    one would silently restart Adam's moments, so it is refused."""
    out = tmp_path / "run"
    run(cfg(teacher_dirs, data, out, max_steps=2, save_every=1), progress=False)
    last = sorted((out / "checkpoints").iterdir())[-1]
    state = json.loads((last / "trainer_state.json").read_text())
    state["optimizer"] = None                      # what save_checkpoint(optimizer=None) writes
    (last / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(MatvlmError, match="DeepSpeed ZeRO or FSDP"):
        run(cfg(teacher_dirs, data, out, max_steps=4, save_every=1), resume=True, progress=False)


def test_staged_run_aligns_first_then_distils_end_to_end_and_resumes_across_the_boundary(
        teacher_dirs, data, tmp_path, monkeypatch):
    """--stage both: the first align_steps train on the layer loss alone (no LM head), each stage with its own
    warmup-stable-decay at its own peak lr; the run resumes bit-exactly from a checkpoint inside stage 1."""
    kw = dict(max_steps=5, save_every=2, stage="both", align_steps=3, align_lr=3e-3, warmup_ratio=0.0,
              decay_ratio=0.5)
    full = run(cfg(teacher_dirs, data, tmp_path / "full", **kw), progress=False)
    rows = read_log(full)
    assert [r["stage"] for r in rows] == ["align"] * 3 + ["e2e"] * 2
    assert all(r["loss_prob"] is None and r["loss_ce"] is None and r["loss_layer"] > 0 for r in rows[:3])
    assert all(r["loss_prob"] is not None for r in rows[3:])
    # each stage decays linearly over its last round(0.5 * n) steps: 3 align steps at 3e-3, 2 e2e steps at 1e-3
    assert [round(r["lr"], 12) for r in rows] == [3e-3, 3e-3, 1.5e-3, 1e-3, 1e-3]
    assert json.loads((full / "distill_config.json").read_text())["stage"] == "both"

    real_forward, calls = DistillStep.forward, {"n": 0}

    def crash_in_step_4(self, **kw):
        calls["n"] += 1
        if calls["n"] > 3 * 4:
            raise KeyboardInterrupt
        return real_forward(self, **kw)

    monkeypatch.setattr(DistillStep, "forward", crash_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg(teacher_dirs, data, tmp_path / "cut", **kw), progress=False)
    monkeypatch.setattr(DistillStep, "forward", real_forward)
    run(cfg(teacher_dirs, data, tmp_path / "cut", **kw), resume=True, progress=False)
    assert [r["loss"] for r in read_log(tmp_path / "cut")] == [r["loss"] for r in rows]


def test_the_align_stage_brings_each_mixer_closer_to_its_attention(teacher_dirs, data, tmp_path):
    out = run(cfg(teacher_dirs, data, tmp_path / "align", max_steps=8, stage="align", lr=3e-3, warmup_ratio=0.0,
                  decay_ratio=0.0), progress=False)
    rows = read_log(out)
    assert all(r["stage"] == "align" and r["loss_prob"] is None for r in rows)
    first, last = rows[0]["loss_layer"], sum(r["loss_layer"] for r in rows[-2:]) / 2
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("bad", [dict(stage="twice"), dict(stage="e2e", align_steps=2),
                                 dict(stage="both", align_steps=4), dict(stage="both", align_lr=-1.0)])
def test_bad_stage_settings_are_refused(teacher_dirs, data, tmp_path, bad):
    with pytest.raises(MatvlmError, match="stage|align"):
        run(cfg(teacher_dirs, data, tmp_path / "x", max_steps=4, **bad), progress=False)


def test_micro_batches_are_cut_from_a_length_sorted_share_of_the_same_samples():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(64)]
    plain = train_mod.BatchPlan(64, 32, 2, 4, seed=3)           # shares of 16: 4 micro-batches of 4
    grouped = train_mod.BatchPlan(64, 32, 2, 4, seed=3, lengths=lengths)
    padded = {"plain": 0, "grouped": 0}
    for rank in (0, 1):
        a = list(plain.micro_batches(rank, 0, 6))
        b = list(grouped.micro_batches(rank, 0, 6))
        for k in range(0, len(a), 4):                     # 4 micro-batches a step and rank
            assert sorted(sum(a[k:k + 4], [])) == sorted(sum(b[k:k + 4], []))
            maxima = [max(lengths[i] for i in mb) for mb in b[k:k + 4]]
            assert maxima == sorted(maxima, reverse=True)
        padded["plain"] += sum(len(mb) * max(lengths[i] for i in mb) for mb in a)
        padded["grouped"] += sum(len(mb) * max(lengths[i] for i in mb) for mb in b)
    assert padded["grouped"] < 0.85 * padded["plain"], padded


def test_grouping_by_length_keeps_every_epoch_complete_and_cuts_padding_across_steps():
    import random

    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(20, 80), rng.randint(700, 1024)]) for _ in range(1000)]
    sorted_only = train_mod.BatchPlan(1000, 32, 2, 8, seed=5, lengths=lengths)
    grouped = train_mod.BatchPlan(1000, 32, 2, 8, seed=5, lengths=lengths, group=8)
    spe = grouped.steps_per_epoch                                         # 31 steps; 8 samples dropped
    for epoch in (0, 1):
        seen = [i for s in range(epoch * spe, (epoch + 1) * spe) for i in grouped.global_indices(s)]
        plain = [i for s in range(epoch * spe, (epoch + 1) * spe) for i in sorted_only.global_indices(s)]
        assert len(seen) == len(set(seen)) == spe * 32 and set(seen) == set(plain)   # the same usable samples
    assert [grouped.global_indices(s) for s in range(40)] == [grouped.global_indices(s) for s in range(40)]
    assert grouped.global_indices(3) != grouped.global_indices(3 + spe)          # another order each epoch

    def cost(plan):                                       # positions computed per real token, both ranks
        mbs = [mb for rank in (0, 1) for mb in plan.micro_batches(rank, 0, 2 * spe)]
        return sum(len(mb) * max(lengths[i] for i in mb) for mb in mbs) / sum(lengths[i] for mb in mbs for i in mb)

    assert cost(sorted_only) > 1.3 and cost(grouped) < 1.1
    shares = [list(grouped.micro_batches(rank, 7, 8)) for rank in (0, 1)]       # the ranks split step 7
    assert sorted(i for mbs in shares for mb in mbs for i in mb) == sorted(grouped.global_indices(7))


def test_micro_batches_cut_by_positions_hold_the_same_samples_within_the_budget():
    import random

    rng = random.Random(2)
    lengths = [rng.choice([rng.randint(20, 80), rng.randint(300, 1024)]) for _ in range(1000)]
    rows = train_mod.BatchPlan(1000, 64, 2, 8, seed=5, lengths=lengths, group=8)
    by_tokens = train_mod.BatchPlan(1000, 64, 2, 8, seed=5, lengths=lengths, group=8, tokens=2048)
    counts = set()
    for rank in (0, 1):
        for step in range(40):
            a, b = rows.step_micro_batches(rank, step), by_tokens.step_micro_batches(rank, step)
            assert sorted(sum(a, [])) == sorted(sum(b, []))              # the same samples, each once
            assert all(len(mb) == 1 or len(mb) * max(lengths[i] for i in mb) <= 2048 for mb in b)
            assert len(a) == 4                                             # rows: 32 / 8 a step
            counts.add(len(b))
            short = [mb for mb in b if max(lengths[i] for i in mb) <= 80]
            assert all(len(mb) >= 25 for mb in short[:-1])               # short rows: many to a forward
    assert len(counts) > 3                                                # the count follows the lengths
    assert list(by_tokens.micro_batches(1, 3, 5)) == by_tokens.step_micro_batches(1, 3) + \
        by_tokens.step_micro_batches(1, 4)


def test_micro_batch_tokens_does_not_change_the_run(teacher_dirs, data, tmp_path, monkeypatch):
    """Cutting each step's share by positions takes other micro-batches but the same losses."""
    seen = []
    real = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", lambda r, step, micro: (
        seen.append([b["input_ids"].shape for b in micro]), real(r, step, micro))[1])
    run(cfg(teacher_dirs, data, tmp_path / "rows", max_steps=3, save_every=100))
    rows, seen[:] = list(seen), []
    run(cfg(teacher_dirs, data, tmp_path / "tok", max_steps=3, save_every=100, micro_batch_tokens=150))
    assert [len(s) for s in rows] == [4, 4, 4] and [len(s) for s in seen] != [4, 4, 4]
    assert all(s[0] * s[1] <= 150 or s[0] == 1 for step in seen for s in step)
    for ra, rb in zip(read_log(tmp_path / "rows"), read_log(tmp_path / "tok")):
        assert ra["tokens"] == rb["tokens"]
        for k in ("loss", "loss_layer", "loss_prob"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]), (k, ra[k], rb[k])


def test_group_by_length_is_a_setting_that_reaches_the_plan(teacher_dirs, data, tmp_path, monkeypatch):
    made = []
    real = train_mod.BatchPlan
    monkeypatch.setattr(train_mod, "BatchPlan", lambda *a, **k: made.append(k) or real(*a, **k))
    run(cfg(teacher_dirs, data, tmp_path / "g", max_steps=2, save_every=100, group_by_length=True), progress=False)
    assert made[-1]["group"] == train_mod.GROUP_STEPS


def test_micro_batch_size_does_not_change_the_run(teacher_dirs, data, tmp_path):
    """Accumulating length-sorted micro-batches gives the losses of one micro-batch per step."""
    run(cfg(teacher_dirs, data, tmp_path / "mb2", max_steps=3, save_every=100))
    run(cfg(teacher_dirs, data, tmp_path / "mb8", max_steps=3, save_every=100, micro_batch_size=8))
    a, b = read_log(tmp_path / "mb2"), read_log(tmp_path / "mb8")
    for ra, rb in zip(a, b):
        assert ra["tokens"] == rb["tokens"]
        for k in ("loss", "loss_layer", "loss_prob"):
            assert abs(ra[k] - rb[k]) <= 1e-5 * abs(ra[k]), (k, ra[k], rb[k])


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_compiled_layers_give_the_eager_losses(tmp_path, ratio):
    """--compile: the attention layers (and the Mamba layers' norms and MLPs) run as compiled graphs (teacher and
    student pass, varying lengths), 9 of the one kind, more than dynamo's recompile limit, without hitting it
    (a hit would fall back to eager silently), and the run's losses and gradient norms are the eager run's."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    from matvlm.toy.tiny import save_teacher, tiny_causal_lm

    model, tok = tiny_causal_lm("llama", n_layer=12, kv_heads=2, seed=3)
    teacher = save_teacher(model, tok, tmp_path / "teacher")
    text = tmp_path / "text.jsonl"
    words = "the cat sat on the mat and a quick brown fox jumps over the lazy dog".split()
    text.write_text("".join(json.dumps({"text": " ".join(words[: 4 + i % 11])}) + "\n" for i in range(16)))
    kw = dict(teacher=str(teacher), data=str(text), out=None, mamba_ratio=ratio, global_batch_size=8,
              micro_batch_size=2, max_steps=2, save_every=2, tensorboard=False, lr=1e-3)
    eager = run(DistillConfig(**{**kw, "out": str(tmp_path / "eager")}), progress=False)
    torch._dynamo.reset()                                            # no graphs cached by earlier tests
    counters.clear()
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        compiled = run(DistillConfig(**{**kw, "out": str(tmp_path / "compiled"), "compile": True}), progress=False)
    n_mamba = len(matvlm.load(compiled).hybrid_config.mamba_layers)
    assert max(n_mamba, 12 - n_mamba) == 9
    assert counters["stats"]["unique_graphs"] >= 1                  # the layers did run compiled
    for a, b in zip(read_log(eager), read_log(compiled), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) < 1e-3
