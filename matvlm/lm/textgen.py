"""General-text distillation data from the teacher itself (`matvlm self-generate --kind text`).

Short greedy chat answers cover a sliver of what a language model knows: a student distilled on them
imitates the teacher's answers and loses its behaviour on ordinary text. This module samples the
teacher's own distribution more widely, through the engine in large batches:

  - plain-text continuations from the start of a document (the tokenizer's BOS, or its document
    separator) and from short seeds of many kinds (prose, news, dialogue, code, lists, letters, maths,
    encyclopaedic and instructional openings), sampled with temperature and top-p;
  - chats: the synthetic training prompts (`lm.prompts`, training topics only), answered greedily for
    half of them and sampled for the other half;
  - long sequences (`max_new_tokens`, 1024 by default), every generated token a training target.

Item i of a run is a pure function of (seed, i): its kind, seed text and sampling seed. Rows are
appended to `OUT.partial` as batches finish, so a cut run continues after the items already there; a
rerun with other settings is refused. Rows whose normalised text was already seen (exact duplicates)
and degenerate rows (loops: under half of their 8-grams distinct; or fewer than `min_tokens` tokens)
are dropped and counted. Generation stops once `tokens` training tokens are kept; OUT (a text JSONL of
`{"id", "text"}` and `{"id", "messages"}` lines that `matvlm distill --data` reads) and OUT.meta.json
are then written atomically.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import sys
import time
from pathlib import Path

from ..errors import MatvlmError
from .prompts import TASKS, TOPICS_TRAIN
from .selfgen import complete_rows

# Openings of documents of many kinds; a seeded item starts from one of them (the teacher continues).
SEEDS = [
    # prose and stories
    "Once upon a time", "It was a cold morning in", "She opened the door and", "The old man looked at",
    "Chapter 1\n\n", "When I was young, my grandmother", "The rain had not stopped for", "He had never seen",
    "In a small village by the sea,", "The letter arrived on a Tuesday.",
    # news and reports
    "BREAKING:", "The city council voted on Monday to", "According to a new study published in",
    "Officials said the", "Shares of the company rose", "The government announced today that",
    "Local residents gathered on", "In an interview with reporters,",
    # encyclopaedic
    "The history of", "is a species of", "was a French painter who", "The river rises in",
    "In mathematics, a", "In physics, the", "The population of the town", "The term refers to",
    "The university was founded in", "The war began in",
    # instructions, recipes, lists
    "How to", "Step 1:", "Ingredients:\n-", "To install the package, run", "Here are ten tips for",
    "1.", "Preheat the oven to", "Frequently Asked Questions\n\nQ:", "Before you begin, make sure",
    "The following steps explain how",
    # dialogue and forums
    "\"Where are you going?\" she asked.", "Q: What is the best way to", "Re: Problem with",
    "Thanks for the reply!", "Interviewer: Can you tell us about", "Dear Sir or Madam,",
    "Hi everyone, I have a question about", "User review:", "Dear diary,",
    # code and technical
    "def ", "import numpy as np\n", "#include <stdio.h>\n", "<!DOCTYPE html>\n", "SELECT", "function ",
    "class ", "# README\n\n", "The function returns", "Error: ", "$ git", "public static void",
    # maths and science
    "Let x be a real number such that", "Theorem 1.", "Solve for x:", "The derivative of",
    "Photosynthesis is", "The experiment showed that", "Abstract\n\n", "Proof.", "If a train leaves",
    "The probability that",
    # opinion, letters, misc
    "I think that", "In my opinion,", "Why do people", "The best thing about", "Welcome to",
    "Our mission is to", "Terms and Conditions\n\n", "Dear John,", "Breaking down the", "Top 10",
    "The year was", "Imagine a world where", "There are many reasons why", "Have you ever wondered",
    "My favourite", "Today I learned", "The main difference between", "A brief guide to",
]

KINDS = ("document", "seed", "chat")
PROMPT_ALLOWANCE = 512  # --continuous: prompt tokens a slot holds besides --max-new-tokens
BARREN_LIMIT = 20     # batches in a row that keep nothing stop the run (an untrained or broken teacher)


def document_start(tokenizer) -> list[int]:
    """The token ids a document starts from: the tokenizer's BOS when it adds one, else its document
    separator (`<|endoftext|>`, as in GPT-2-style pretraining data), else its EOS."""
    ids = tokenizer("")["input_ids"]
    if ids:
        return list(ids)
    sep = tokenizer.convert_tokens_to_ids("<|endoftext|>") if "<|endoftext|>" in tokenizer.get_vocab() else None
    for tid in (sep, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return [int(tid)]
    raise MatvlmError("the tokenizer has no BOS, document separator or EOS token to start a document from")


def plan_item(i: int, seed: int, chat_fraction: float, document_fraction: float) -> dict:
    """Item i of a run: {"id", "kind", "seed_text" or "prompt", "greedy"} (a pure function of seed, i)."""
    rng = random.Random(f"{seed}:{i}")
    u = rng.random()
    if u < chat_fraction:
        prompt = rng.choice(TASKS).format(t=rng.choice(TOPICS_TRAIN))
        return {"id": f"c{i}", "kind": "chat", "prompt": prompt, "greedy": rng.random() < 0.5}
    if u < chat_fraction + document_fraction:
        return {"id": f"d{i}", "kind": "document", "seed_text": "", "greedy": False}
    return {"id": f"s{i}", "kind": "seed", "seed_text": rng.choice(SEEDS), "greedy": False}


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def repetitive(ids: list[int], n: int = 8) -> bool:
    """A loop: fewer than half of the sequence's n-grams are distinct (long sequences only)."""
    grams = [tuple(ids[k:k + n]) for k in range(len(ids) - n + 1)]
    return len(grams) >= 64 and len(set(grams)) < 0.5 * len(grams)


def _static(engine, planned, request, batch_size: int):
    """(i, item, Output) in order, `batch_size` items per `engine.generate` batch."""
    while True:
        batch = list(itertools.islice(planned, batch_size))
        yield from ((i, it, o) for (i, it), o in zip(batch, engine.generate([request(i, it) for i, it in batch])))


def _continuous(engine, planned, request, slots: int, max_new_tokens: int):
    """(i, item, Output) in order of i, generated by the continuous batcher with `slots` requests decoding at
    once; results that finish early wait for the ones before them."""
    from ..engine.scheduler import ContinuousBatcher, Sequence

    # on CUDA new sequences prefill beside the decode steps, as `serve` does (docs/benchmarks.md)
    batcher = ContinuousBatcher(engine, slots=slots, length=max_new_tokens + PROMPT_ALLOWANCE,
                                overlap=engine.device.type == "cuda")
    done: dict[int, tuple] = {}
    items: dict[int, dict] = {}
    following = None
    try:
        while True:
            while len(batcher.waiting) + batcher.n_running < slots:
                i, it = next(planned)
                following = i if following is None else following
                items[i] = it
                batcher.add(Sequence(request(i, it), emit=lambda text: None, stream=False,
                                     finish=lambda out, err, i=i: done.__setitem__(i, (out, err))))
            batcher.step()
            while following in done:
                out, err = done.pop(following)
                if err is not None:
                    raise err
                yield following, items.pop(following), out
                following += 1
    finally:
        batcher.close()


def generate_text_corpus(engine, out: str | Path, tokens: int, max_new_tokens: int = 1024,
                         temperature: float = 1.0, top_p: float = 0.95, chat_fraction: float = 0.3,
                         document_fraction: float = 0.2, min_tokens: int = 32, batch_size: int = 128,
                         seed: int = 0, progress: bool = True, continuous: bool = False) -> dict:
    """Generate about `tokens` training tokens of the teacher's own text into the JSONL `out`.

    Args:
        engine: an `Engine` over the teacher (a text model).
        tokens: stop once this many generated tokens are kept.
        max_new_tokens: length limit of each sequence.
        temperature, top_p: sampling of text continuations and of the sampled half of the chats.
        chat_fraction, document_fraction: shares of chat items and of items from the document start
            (the rest start from a seed text).
        min_tokens: shorter sequences are dropped.
        batch_size: sequences per engine batch (static), or requests decoding at once (continuous).
        seed: the run's seed (items, sampling).
        continuous: generate through the continuous batcher (`engine.scheduler`): a finished sequence's
            slot takes the next item at once, where a static batch decodes until its longest sequence
            ends. Items are still written in order, so the file is the same either way up to float
            rounding of different batch compositions.
    Returns:
        {"path", "rows", "tokens", "generated_tokens", "seconds", "dropped": {"duplicate", "repetitive",
        "short"}, "kinds": {kind: rows}}.
    """
    from tqdm.auto import tqdm

    from ..engine.engine import Request
    from ..inputs.prompts import render
    from ..engine.sampling import SamplingParams
    from ..model.io import atomic_write_text

    if engine.vlm:
        raise MatvlmError("--kind text generates plain text and chats for text models; this teacher is a VLM")
    for name, v, lo, hi in (("temperature", temperature, 0, 10), ("top_p", top_p, 1e-9, 1),
                            ("chat_fraction", chat_fraction, 0, 1), ("document_fraction", document_fraction, 0, 1)):
        if not lo <= v <= hi:
            raise MatvlmError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {v}")
    if chat_fraction + document_fraction > 1:
        raise MatvlmError(f"--chat-fraction + --document-fraction must be <= 1, got {chat_fraction + document_fraction}")
    if tokens < 1 or max_new_tokens < 1 or batch_size < 1:
        raise MatvlmError("--tokens, --max-new-tokens and --batch-size must be >= 1")
    if min_tokens > max_new_tokens:
        raise MatvlmError(f"min_tokens ({min_tokens}) exceeds --max-new-tokens ({max_new_tokens}): nothing could be kept")
    out = Path(out)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                "chat_fraction": chat_fraction, "document_fraction": document_fraction, "min_tokens": min_tokens,
                "seed": seed}
    fp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta_path = out.with_name(out.name + ".meta.json")
    if out.exists():
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("fingerprint") != fp or meta.get("tokens_target") != tokens:
            raise MatvlmError(f"{out} exists but was written with other settings; remove it or choose another output")
        return {**meta["result"], "generated_tokens": 0, "seconds": 0.0}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    rows = complete_rows(partial)
    if any(r.get("fp") != fp for r in rows):
        raise MatvlmError(f"{partial} was written with other settings; remove it to start over")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    tok = engine.tokenizer
    start_ids = document_start(tok)
    seen = {r["hash"] for r in rows if r.get("keep")}
    kept = sum(r["n"] for r in rows if r.get("keep"))
    next_i = max((r["i"] for r in rows), default=-1) + 1
    generated, t0, barren = 0, time.perf_counter(), 0      # barren: batches in a row that kept nothing
    bar = tqdm(total=tokens, initial=min(kept, tokens), desc="self-generate text", unit="tok", unit_scale=True,
               disable=not progress, file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30)
    def request(i: int, it: dict) -> Request:
        greedy = it["greedy"]
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, seed=None if greedy else seed * 1_000_003 + i)
        if it["kind"] == "chat":
            prompt = render(engine.processor, engine.model.config, [{"role": "user", "content": it["prompt"]}])
        else:
            prompt = start_ids + tok(it["seed_text"], add_special_tokens=False)["input_ids"]
        return Request(prompt=prompt, params=params)

    planned = ((i, plan_item(i, seed, chat_fraction, document_fraction)) for i in itertools.count(next_i))
    produced = (_continuous(engine, planned, request, batch_size, max_new_tokens) if continuous
                else _static(engine, planned, request, batch_size))
    with partial.open("a", encoding="utf-8") as f:
        kept_before = kept
        # the budget is checked at the end of every batch_size items counted from item 0, so a resumed run
        # stops at the same item as an uninterrupted one whatever order the items finished in
        for i, it, o in (produced if kept < tokens else ()):
            generated += len(o.token_ids)
            if it["kind"] == "chat":
                body = o.text.strip()
                row = {"id": it["id"], "messages": [{"role": "user", "content": it["prompt"]},
                                                    {"role": "assistant", "content": body}]}
            else:
                body = it["seed_text"] + o.text
                row = {"id": it["id"], "text": body}
            h = hashlib.sha256(normalise(body).encode()).hexdigest()[:20]
            why = ("short" if len(o.token_ids) < min_tokens or not body.strip() else
                   "repetitive" if repetitive(o.token_ids) else "duplicate" if h in seen else None)
            rec = {"i": i, "fp": fp, "kind": it["kind"], "n": len(o.token_ids), "hash": h, "keep": why is None,
                   "why": why, "row": row if why is None else None}
            if why is None:
                seen.add(h)
                kept += len(o.token_ids)
                bar.update(len(o.token_ids))
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if (i + 1) % batch_size:
                continue
            f.flush()
            barren = 0 if kept > kept_before else barren + 1
            kept_before = kept
            if barren >= BARREN_LIMIT:
                raise MatvlmError(f"the last {BARREN_LIMIT} batches kept nothing (every sequence a duplicate, a loop or "
                                  f"shorter than {min_tokens} tokens): is this a trained model? Rows so far: {partial}")
            if kept >= tokens:
                break
    bar.close()
    rows = complete_rows(partial)
    final = [r for r in rows if r["keep"]]
    dropped = {k: sum(r["why"] == k for r in rows) for k in ("duplicate", "repetitive", "short")}
    result = {"path": str(out), "rows": len(final), "tokens": sum(r["n"] for r in final), "dropped": dropped,
              "kinds": {k: sum(r["kind"] == k for r in final) for k in KINDS}}
    atomic_write_text(out, "".join(json.dumps(r["row"], ensure_ascii=False) + "\n" for r in final))
    atomic_write_text(meta_path, json.dumps({"fingerprint": fp, "settings": settings, "tokens_target": tokens,
                                             "document_start": start_ids, "result": result}, indent=1) + "\n")
    partial.unlink()
    return {**result, "generated_tokens": generated, "seconds": round(time.perf_counter() - t0, 2)}
