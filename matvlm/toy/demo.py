"""`matvlm demo`: the whole method on the embedded default, on a CPU, in minutes.

convert the shipped toy teacher at 25 % (even placement) -> distil it on Shapes-VQA for a fixed
budget -> evaluate teacher and student on held-out questions -> print them side by side
(accuracy per question type, generation tokens/s, cache memory) -> answer one question about a
freshly drawn image.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.cache import cache_kwarg
from ..model.io import atomic_write_text
from . import shapes
from .teacher import TEMPLATE, question_of

ASSET = Path(__file__).resolve().parent.parent / "assets" / "toy-teacher"


@dataclass(frozen=True)
class Budget:
    """How much the demo does: distillation steps and samples, evaluation questions."""

    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    alpha: float
    train_images: int
    eval_images: int


# The default was tuned on a 2-core CPU (docs/results.md): small batches and many steps learn fastest
# in a fixed wall time, and the per-token layer distance (tens) needs a small weight beside the KL (~1).
BUDGETS = {
    "default": Budget(steps=450, global_batch=8, micro_batch=8, lr=3e-3, alpha=0.02, train_images=1000,
                      eval_images=60),
    "tiny": Budget(steps=2, global_batch=4, micro_batch=4, lr=3e-3, alpha=0.02, train_images=8, eval_images=2),
}


def cache_bytes(cache) -> int:
    """Bytes held by a generation cache: KV tensors of attention layers, conv + SSM states of Mamba layers."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if isinstance(t, torch.Tensor))
    return total


@torch.no_grad()
def evaluate(model, processor, records: list[dict], root: Path, batch_size: int = 64) -> dict:
    """Accuracy (overall, per type), greedy-generation tokens/s, and the cache size of one sample."""
    from ..engine.simple import build_inputs

    tok = processor.tokenizer
    preds, generated, seconds = {}, 0, 0.0
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        inputs = build_inputs(processor, [question_of(r) for r in chunk], [root / r["image"] for r in chunk], TEMPLATE)
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        seconds += time.perf_counter() - t0
        new = out[:, inputs["input_ids"].shape[1]:]
        generated += int((new != tok.pad_token_id).sum())
        preds.update({r["id"]: a.strip() for r, a in zip(chunk, tok.batch_decode(new, skip_special_tokens=True))})
    result = shapes.accuracy(preds, records)
    one = build_inputs(processor, [question_of(records[0])], [root / records[0]["image"]], TEMPLATE)
    cache = model.new_cache()
    model.generate(**one, max_new_tokens=16, min_new_tokens=16, do_sample=False, **{cache_kwarg(model): cache},
                   pad_token_id=tok.pad_token_id)
    result["tokens_per_s"] = generated / max(seconds, 1e-9)
    result["cache_bytes"] = cache_bytes(cache)
    result["cache_tokens"] = int(one["input_ids"].shape[1]) + 16
    return result


def table(teacher: dict, student: dict, n_mamba: int, n_layer: int) -> str:
    rows = [("question type", "teacher", f"student ({n_mamba}/{n_layer} Mamba)")]
    for q in shapes.QTYPES:
        rows.append((q, f"{100 * teacher['per_qtype'].get(q, 0):.1f} %", f"{100 * student['per_qtype'].get(q, 0):.1f} %"))
    rows.append(("overall", f"{100 * teacher['overall']:.1f} %", f"{100 * student['overall']:.1f} %"))
    keep = student["overall"] / teacher["overall"] if teacher["overall"] else 0.0
    rows.append(("kept of teacher", "", f"{100 * keep:.1f} %"))
    rows.append(("generation tokens/s (CPU)", f"{teacher['tokens_per_s']:.0f}", f"{student['tokens_per_s']:.0f}"))
    rows.append((f"cache at {teacher['cache_tokens']} tokens", f"{teacher['cache_bytes'] / 1024:.0f} KiB",
                 f"{student['cache_bytes'] / 1024:.0f} KiB"))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


DEFAULT_OUT = Path("runs/demo")


def run(out: Path | None = None, budget: str = "default", teacher: Path | None = None, seed: int = 0,
        log=print) -> dict:
    """Run the demo, writing everything under `out` (default `runs/demo`, relative to the working directory):
    data/, student-init/, student/ and demo.json (the two evaluations). Returns what demo.json holds."""
    import matvlm

    from ..convert import convert
    from ..distill.config import DistillConfig
    from ..distill.train import run as distill

    if budget not in BUDGETS:
        from ..errors import MatvlmError
        raise MatvlmError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    b = BUDGETS[budget]
    teacher = Path(teacher) if teacher else ASSET
    work = Path(out) if out else DEFAULT_OUT
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"writing everything under {work}{'' if out else ' (choose with --out)'}")

    log(f"[1/5] Shapes-VQA data: {b.train_images} training images, {b.eval_images} held-out images -> {work / 'data'}")
    splits = shapes.make_splits(work / "data", n_train=b.train_images, n_test=b.eval_images, seed=1000 + seed,
                                questions_per_image=6)
    log("[2/5] convert: 25 % of the teacher's layers become Mamba-2 (even placement), init from attention")
    init = convert(teacher, work / "student-init", mamba_ratio=0.25, overwrite=True, seed=seed)
    log(f"[3/5] distill: {b.steps} steps of {b.global_batch} samples, {b.alpha} L_layer + L_prob, lr {b.lr}")
    student_dir = work / "student"
    if student_dir.exists():
        import shutil
        shutil.rmtree(student_dir)
    cfg = DistillConfig(teacher=str(teacher), student=str(init), data=str(splits["train"]), out=str(student_dir),
                        template=TEMPLATE, max_steps=b.steps, global_batch_size=b.global_batch,
                        micro_batch_size=b.micro_batch, lr=b.lr, alpha=b.alpha, save_every=10 ** 9,
                        tensorboard=False, seed=seed)
    distill(cfg, progress=True)
    log("[4/5] evaluate teacher and student on the held-out questions")
    records = shapes.load_samples(splits["test"])
    root = Path(splits["test"]).parent
    t_model, s_model = matvlm.load(teacher, dtype="float32"), matvlm.load(student_dir, dtype="float32")
    proc = matvlm.load_processor(teacher)
    t_res, s_res = evaluate(t_model, proc, records, root), evaluate(s_model, proc, records, root)
    cfg_h = s_model.hybrid_config
    log(table(t_res, s_res, len(cfg_h.mamba_layers), cfg_h.n_layer))

    log("[5/5] a freshly drawn image")
    rng = random.Random(time.time_ns() if seed == 0 else seed)
    scene = shapes.sample_scene(rng, 3, 4)
    image_path = student_dir / "fresh.png"
    shapes.render(scene).save(image_path)
    from ..engine.simple import answer_batch
    question = "Describe the image."
    answer = answer_batch(s_model, proc, [question], [image_path], template=TEMPLATE)[0]
    log(f"image: {image_path}\nQ: {question}\nstudent: {answer}\ntruth:   {shapes.describe(scene)}")
    log(f"done in {time.time() - t_start:.0f} s; teacher: {teacher}; student: {student_dir}")
    summary = {"teacher": t_res, "student": s_res, "student_dir": str(student_dir), "fresh_image": str(image_path),
               "fresh_answer": answer, "fresh_truth": shapes.describe(scene), "seconds": time.time() - t_start}
    atomic_write_text(work / "demo.json", json.dumps(summary, indent=1) + "\n")
    return summary
