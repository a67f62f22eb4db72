"""Sequence-level distillation data: the teacher's own answers to a set of prompts.

A user with no SFT data writes prompts (or takes `synthetic:N`), the teacher answers them through
the engine, and the conversations become a chat JSONL that `matvlm distill` trains on (the KL and
layer losses then see exactly the distribution the teacher produces; Kim & Rush 2016 call this
sequence-level knowledge distillation).

Output lines: `{"id", "messages": [..., {"role": "assistant", "content": answer}], "finish_reason"}`.
Writing is resumable and atomic: answers are appended to `OUT.partial` as batches finish, a
rerun skips the ids already there, and OUT is written when every prompt is answered, with
`OUT.meta.json` (a fingerprint of the prompts, counts, the ids whose answer came out empty, which
are left out since there is nothing to learn from them). An existing OUT is reused only for the
same prompts.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from ..errors import MatvlmError
from .prompts import read_prompts


def complete_rows(partial: Path) -> list[dict]:
    """The complete lines of an interrupted run (a line cut by the interruption is dropped). Lines end at
    "\n" only: str.splitlines would also cut at U+2028 and other separators that text may hold."""
    rows = []
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").split("\n")[:-1]:   # the last piece has no newline
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def fingerprint(items: list[dict]) -> str:
    """A hash of the prompts (ids and messages): an existing output is reused only for the same prompts."""
    return hashlib.sha256(json.dumps(items, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def self_generate(engine, prompts: str | Path, out: str | Path, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 32,
                  progress: bool = True) -> dict:
    """Answer every prompt with `engine` (the teacher's) and write the chat JSONL `out`.

    Returns:
        `{"path", "n", "generated", "tokens", "seconds", "truncated", "empty"}` (`n`: conversations written;
        `generated`: prompts answered in this call; `truncated`: answers cut by `max_new_tokens`;
        `empty`: prompts left out because the answer was empty).
    """
    from tqdm.auto import tqdm

    from ..engine.engine import Request
    from ..inputs.prompts import render
    from ..engine.sampling import SamplingParams
    from ..model.io import atomic_write_text

    out = Path(out)
    items = read_prompts(prompts)
    fp = fingerprint(items)
    meta_path = out.with_name(out.name + ".meta.json")
    if out.exists():
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("fingerprint") != fp:
            raise MatvlmError(f"{out} exists but was not written from these prompts ({prompts}); remove it or "
                              "choose another output")
        return {"path": str(out), "n": meta["answers"], "generated": 0, "tokens": 0, "seconds": 0.0,
                "truncated": meta["truncated"], "empty": len(meta["empty_ids"])}
    if batch_size < 1:
        raise MatvlmError(f"--batch-size must be >= 1, got {batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    kept = complete_rows(partial)
    known = {p["id"]: p for p in items}
    for row in kept:
        if row.get("id") not in known or row.get("fp") != fp:
            raise MatvlmError(f"{partial} holds answers to other prompts than {prompts}; remove it to start over")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    done = {r["id"] for r in kept}
    todo = [p for p in items if p["id"] not in done]
    tokens = 0
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
                row = {"id": p["id"], "messages": p["messages"] + [{"role": "assistant", "content": answer}],
                       "finish_reason": o.finish_reason, "fp": fp}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(chunk))
    bar.close()
    rows = complete_rows(partial)
    empty = [r["id"] for r in rows if not r["messages"][-1]["content"]]   # nothing to learn from
    final = [{k: v for k, v in r.items() if k != "fp"} for r in rows if r["messages"][-1]["content"]]
    truncated = sum(r["finish_reason"] == "length" for r in final)
    meta = {"prompts": str(prompts), "fingerprint": fp, "prompts_n": len(items), "answers": len(final),
            "empty_ids": empty, "truncated": truncated, "max_new_tokens": max_new_tokens,
            "temperature": temperature}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final))
    partial.unlink()
    return {"path": str(out), "n": len(final), "generated": len(todo), "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 2), "truncated": truncated, "empty": len(empty)}


