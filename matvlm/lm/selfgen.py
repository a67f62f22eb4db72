"""Sequence-level distillation data: the teacher's own answers to a set of prompts.

A user with no SFT data writes prompts (or takes `synthetic:N`), the teacher answers them through
the engine, and the conversations become a chat JSONL that `matvlm distill` trains on (the KL and
layer losses then see exactly the distribution the teacher produces; Kim & Rush 2016 call this
sequence-level knowledge distillation).

Output lines: `{"id", "messages": [..., {"role": "assistant", "content": answer}], "finish_reason"}`.
Writing is resumable and atomic: answers are appended to `OUT.partial` as batches finish, a
rerun skips the ids already there, and the file is renamed to OUT when every prompt is answered.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import MatvlmError
from .prompts import read_prompts


def _done_ids(partial: Path) -> set[str]:
    ids = set()
    if partial.exists():
        with partial.open(encoding="utf-8") as f:
            for line in f:
                try:
                    ids.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut by an interruption ends what counts as done
    return ids


def self_generate(engine, prompts: str | Path, out: str | Path, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """Answer every prompt with `engine` (the teacher's) and write the chat JSONL `out`.

    Returns:
        `{"path", "n", "generated", "tokens", "seconds", "truncated"}` (`generated`: answered in this call;
        `truncated`: answers cut by `max_new_tokens`).
    """
    from tqdm.auto import tqdm

    from ..engine.engine import Request
    from ..engine.prompts import render
    from ..engine.sampling import SamplingParams

    out = Path(out)
    items = read_prompts(prompts)
    if out.exists():
        n = sum(1 for line in out.read_text(encoding="utf-8").splitlines() if line.strip())
        if n != len(items):
            raise MatvlmError(f"{out} exists with {n} answers but there are {len(items)} prompts; "
                              "remove it or choose another output")
        return {"path": str(out), "n": n, "generated": 0, "tokens": 0, "seconds": 0.0, "truncated": 0}
    if batch_size < 1:
        raise MatvlmError(f"--batch-size must be >= 1, got {batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    done = _done_ids(partial)
    if partial.exists():  # drop a cut last line before appending
        keep = [line for line in partial.read_text(encoding="utf-8").splitlines(keepends=True)
                if line.endswith("\n") and _parses(line)]
        partial.write_text("".join(keep), encoding="utf-8")
    todo = [p for p in items if p["id"] not in done]
    tokens = truncated = 0
    start = time.perf_counter()
    bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="self-generate", unit="prompt",
               disable=not progress, file=sys.stderr, mininterval=1 if sys.stderr.isatty() else 30)
    with partial.open("a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            requests = [Request(prompt=render(engine.processor, engine.model.config, p["messages"]),
                                params=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                                      top_p=top_p, seed=None if temperature == 0 else seed + b + i))
                        for i, p in enumerate(chunk)]
            for p, o in zip(chunk, engine.generate(requests)):
                answer = o.text.strip()
                tokens += len(o.token_ids)
                truncated += o.finish_reason == "length"
                row = {"id": p["id"], "messages": p["messages"] + [{"role": "assistant", "content": answer}],
                       "finish_reason": o.finish_reason}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    os.replace(partial, out)
    return {"path": str(out), "n": len(items), "generated": len(todo), "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 2), "truncated": truncated}


def _parses(line: str) -> bool:
    try:
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False
