"""`eval-lm`: how much of a text teacher a hybrid student keeps, on the same held-out text.

Per model: perplexity `exp(mean NLL)` over the label tokens of a text JSONL (every token of a
`{"text"}` line; the answers and their end of turn of a `{"messages"}` chat, as `distill` learns
them). With a teacher, on the same positions: the mean token KL(teacher || student) in nats and
greedy next-token agreement (the share of positions where both models' argmax agree). Then both
models answer a fixed prompt set greedily through the engine, side by side, and the decode speed
of that batch is measured (a warm-up run first, so graph capture and allocation are not timed).

Scores and answers use float32 weights (on any device) unless `dtype` says otherwise: SmolLM2's
first answer token to "What is the capital of France?" wins by 0.08 logits, which bfloat16 rounding flips.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

from ..errors import MatvlmError
from ..ops.attention import sdpa_without_cudnn
from .prompts import FIXED_PROMPTS, read_prompts


@torch.no_grad()
def score_text(models: dict, dataset, batch_size: int = 4, device: str | torch.device = "cpu",
               progress: bool = True) -> dict:
    """NLL per model and, with a "teacher" and a "student", KL and agreement, over `dataset`'s labels.

    Args:
        models: {"teacher": model, "student": model} (either may be missing; at least one).
    Returns:
        {"tokens", "sequences", "<name>": {"nll", "ppl"}, "kl", "agreement"} (kl/agreement with both models).
    """
    from tqdm.auto import tqdm

    from ..inputs.data import collate

    if len(dataset) == 0:
        raise MatvlmError("the evaluation data holds no usable sample")
    sums = {name: 0.0 for name in models}
    kl = agree = 0.0
    n_tok = 0
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))  # less padding
    for b in tqdm(range(0, len(order), batch_size), desc="eval-lm", unit="batch", disable=not progress):
        batch = collate([dataset[i] for i in order[b:b + batch_size]], dataset.pad_token_id)
        ids = batch["input_ids"].to(device)
        mask = batch["attention_mask"].to(device)
        target = batch["labels"][:, 1:].to(device)
        keep = target != -100
        if not keep.any():
            continue
        logp = {}
        for name, model in models.items():
            with sdpa_without_cudnn():                     # a new length per batch: see its doc
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
            logp[name] = torch.log_softmax(logits, dim=-1)
            sums[name] += -logp[name].gather(-1, target[keep][:, None]).sum().item()
        if "teacher" in logp and "student" in logp:
            t, s = logp["teacher"], logp["student"]
            kl += (t.exp() * (t - s)).sum().item()
            agree += (t.argmax(-1) == s.argmax(-1)).sum().item()
        n_tok += int(keep.sum())
    out = {"tokens": n_tok, "sequences": len(dataset)}
    for name, total in sums.items():
        out[name] = {"nll": total / n_tok, "ppl": math.exp(total / n_tok)}
    if "teacher" in models and "student" in models:
        out["kl"] = kl / n_tok
        out["agreement"] = agree / n_tok
    return out


def answer_side_by_side(engines: dict, prompts: list[dict], max_new_tokens: int = 64) -> tuple[list[dict], dict]:
    """Greedy answers of every engine to `prompts`, and each engine's decode speed on that batch.

    `tokens_per_s` counts answer tokens (rows that stopped early add none while the batch runs on);
    `ms_per_step` is the engine's time per decode step of the whole batch, the cleaner speed figure.

    Returns:
        ([{"prompt", "<name>": answer, ...}], {"<name>": {"tokens_per_s", "ms_per_step", "new_tokens", "seconds",
        "batch"}})
    """
    from ..engine.engine import Request
    from ..engine.sampling import SamplingParams
    from ..inputs.prompts import render

    rows = [{"prompt": p["messages"][-1]["content"]} for p in prompts]
    speed = {}
    for name, engine in engines.items():
        def requests(n):
            return [Request(prompt=render(engine.processor, engine.model.config, p["messages"]),
                            params=SamplingParams(max_new_tokens=n)) for p in prompts]

        engine.generate(requests(4))  # warm-up: allocation, graph capture
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        start = time.perf_counter()
        outs = engine.generate(requests(max_new_tokens))
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - start
        new = sum(len(o.token_ids) for o in outs)
        per_step = outs[0].timings.get("decode_s_per_step")
        speed[name] = {"tokens_per_s": round(new / seconds, 1), "new_tokens": new, "seconds": round(seconds, 3),
                       "batch": len(prompts), "ms_per_step": round(1e3 * per_step, 3) if per_step else None}
        for row, o in zip(rows, outs):
            row[name] = o.text.strip()
    return rows, speed


def eval_lm(student: str | Path, data: str | Path, teacher: str | Path | None = None, max_length: int = 1024,
            batch_size: int = 4, limit: int | None = None, prompts: str | Path | None = None,
            max_new_tokens: int = 64, template: str | None = None, device: str | None = None,
            dtype: str | None = None, progress: bool = True) -> dict:
    """Score `student` (and `teacher`) on the text JSONL `data`, then answer the prompts side by side.

    Returns the record `eval-lm --output` writes (see the module doc): `{"student", "teacher", "data",
    "device", "scores": score_text(...), "ppl_ratio", "speed", "answers"}`.
    """
    from ..convert.formats import load, load_processor
    from ..engine.engine import Engine
    from ..inputs.data import TextJsonlDataset
    from ..inputs.templates import text_template

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    score_dtype = getattr(torch, dtype) if dtype else torch.float32
    paths = {"teacher": teacher, "student": student} if teacher is not None else {"student": student}
    models = {name: load(path, dtype=score_dtype).to(dev).eval() for name, path in paths.items()}
    for name, m in models.items():
        if hasattr(m.config, "vision_config"):
            raise MatvlmError(f"eval-lm scores text models; {paths[name]} is a vision-language model "
                              "(use `matvlm eval`)")
    processors = {name: load_processor(path) for name, path in paths.items()}
    processor = processors["student"]
    if teacher is not None:
        t_tok, s_tok = (getattr(x, "tokenizer", x) for x in (processors["teacher"], processor))
        if t_tok.get_vocab() != s_tok.get_vocab():
            raise MatvlmError(f"{teacher} and {student} have different tokenizers; KL and agreement compare "
                              "the same tokens, so both must share one (a student converted from this teacher does)")
    dataset = TextJsonlDataset(data, processor, text_template(processor, models["student"].config, template),
                               max_length)
    if limit is not None:
        dataset.samples = dataset.samples[:limit]
    scores = score_text(models, dataset, batch_size=batch_size, device=dev, progress=progress)
    # answers in the scoring dtype too: greedy choices between near-tied tokens flip with bf16 rounding
    engines = {name: Engine(m, processors[name], device=dev, dtype=score_dtype)
               for name, m in models.items()}
    asked = read_prompts(prompts) if prompts else [{"id": str(i), "messages": [{"role": "user", "content": p}]}
                                                    for i, p in enumerate(FIXED_PROMPTS)]
    answers, speed = answer_side_by_side(engines, asked, max_new_tokens=max_new_tokens)
    record = {"student": str(student), "teacher": str(teacher) if teacher else None, "data": str(data),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "scores": scores,
              "speed": speed, "answers": answers, "looping_answers": loop_counts(answers)}
    if teacher is not None:
        record["ppl_ratio"] = scores["student"]["ppl"] / scores["teacher"]["ppl"]
    return record


_RUN = re.compile(r"(.{4,}?)(?:[\s,.;:!?-]*\1){2,}", re.S)   # a piece of >= 4 characters, 3+ times in a row


def loops(text: str) -> bool:
    """Whether an answer loops: a piece of 4+ characters with 2+ letters or digits comes 3 times in a row
    (8 times if it is only digits and separators): "a lone soul, a lone soul, a lone soul",
    "30 + 30 = 30 + 30 = 30 + 30", "000,000,000,..."; or some run of 5 words comes 3 times anywhere
    ("... a tapestry of endless blue ..." three times). Case, punctuation and spacing aside. Lists
    whose items share a few words, rules of dashes and ordinary large numbers do not count."""
    t = " ".join(text.lower().split())
    for m in _RUN.finditer(t):
        unit = m.group(1)
        if sum(c.isalnum() for c in unit) < 2:
            continue                                    # dashes, dots, a lone digit
        if not re.fullmatch(r"[\d,. ]+", unit) or len(m.group(0)) >= 8 * len(unit):
            return True                                 # words or sums 3 times; bare digit groups 8 times
    words = re.findall(r"\w+", t)
    grams = [" ".join(words[i:i + 5]) for i in range(len(words) - 4)]
    return any(grams.count(g) >= 3 for g in set(grams))


def loop_counts(answers: list[dict]) -> dict[str, int]:
    """How many of each model's answers loop (`loops`), keyed like the answers ("teacher", "student")."""
    names = [k for k in ("teacher", "student") if answers and k in answers[0]]
    return {n: sum(loops(row[n]) for row in answers) for n in names}


def format_record(rec: dict) -> str:
    """The record as a plain-text table, then the answers side by side."""
    s = rec["scores"]
    names = [n for n in ("teacher", "student") if n in s]
    lines = [f"{'':<22}" + "".join(f"{n:>14}" for n in names)]
    lines.append(f"{'perplexity':<22}" + "".join(f"{s[n]['ppl']:>14.3f}" for n in names))
    lines.append(f"{'NLL (nats/token)':<22}" + "".join(f"{s[n]['nll']:>14.4f}" for n in names))
    lines.append(f"{'decode tokens/s':<22}" + "".join(f"{rec['speed'][n]['tokens_per_s']:>14.1f}" for n in names))
    lines.append(f"{'decode ms/step':<22}" + "".join(f"{rec['speed'][n].get('ms_per_step') or float('nan'):>14.2f}"
                                                      for n in names))
    if "kl" in s:
        lines.append(f"student/teacher perplexity: {rec['ppl_ratio']:.3f}   "
                     f"KL(teacher||student): {s['kl']:.4f} nats/token   greedy agreement: {100 * s['agreement']:.1f} %")
    lines.append(f"({s['tokens']} tokens in {s['sequences']} sequences; speed: batch {len(rec['answers'])}, "
                 f"{rec['device']})")
    if rec.get("looping_answers"):
        lines.append("looping answers: " + ", ".join(f"{n} {k} of {len(rec['answers'])}"
                                                    for n, k in rec["looping_answers"].items()))
    for row in rec["answers"]:
        lines.append(f"\n> {row['prompt']}")
        for n in names:
            lines.append(f"  {n}: {row[n]}" + ("   [loops]" if n in row and loops(row[n]) else ""))
    return "\n".join(lines)


def write_record(rec: dict, path: str | Path) -> None:
    """Write `rec` as JSON atomically (temporary file, then rename)."""
    from ..model.io import atomic_write_text

    atomic_write_text(path, json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
