"""Prompts for text-model distillation and evaluation: prompt files, a synthetic prompt set, and
the fixed prompts `eval-lm` answers side by side.

Prompt files (`read_prompts`):
  .txt    one prompt a line; blank lines and lines starting with "#" are skipped;
  .jsonl  one object a line: `{"prompt": str}` or `{"messages": [{"role", "content"}, ...]}`
          ending with a user message; an optional "id".
The spec `synthetic:N` (or `synthetic-heldout:N`) instead names N prompts built from the task and
topic lists below: a user with no prompt file can still self-generate a training set, and the
held-out prompts use topics the training prompts never mention.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from ..errors import MatvlmError

# The prompts `eval-lm` answers with teacher and student side by side.
FIXED_PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Give three tips for staying healthy.",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "Write a Python function that returns the square of a number.",
]

TASKS = [
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Give three interesting facts about {t}.",
    "Write a short paragraph about {t}.",
    "Describe {t} to a ten-year-old.",
    "What are the advantages and disadvantages of {t}?",
    "Write a haiku about {t}.",
    "Write a four-line poem about {t}.",
    "Summarize the history of {t} in a few sentences.",
    "Why is {t} important?",
    "List five words related to {t}.",
    "Write a short story that involves {t}.",
    "What questions would a student ask about {t}? Give three.",
    "How would you explain {t} to someone who has never heard of it?",
    "Write a tweet about {t}.",
    "What is a common misconception about {t}?",
    "Give a one-sentence definition of {t}.",
    "Compare {t} with something similar and explain the difference.",
    "Write a product description for something inspired by {t}.",
    "What would the world be like without {t}?",
]

TOPICS_TRAIN = [
    "the moon", "volcanoes", "honey bees", "the Roman Empire", "electricity", "chess", "coffee",
    "rainbows", "the internet", "dolphins", "gravity", "the Eiffel Tower", "bicycles", "tea",
    "the human heart", "deserts", "photosynthesis", "jazz music", "the Great Wall of China",
    "earthquakes", "penguins", "recycling", "the printing press", "football", "chocolate",
    "clouds", "the solar system", "elephants", "democracy", "vaccines", "trains", "mountains",
    "the Amazon rainforest", "bread", "computers", "whales", "the ocean", "friendship", "books",
    "libraries", "mathematics", "the piano", "rivers", "snow", "airplanes", "the brain", "cats",
    "dogs", "gardening", "the Olympic Games", "time zones", "batteries", "glaciers", "owls",
    "the Renaissance", "coral reefs", "wind energy", "the alphabet", "bridges", "maps", "rice",
    "thunderstorms", "the telescope", "ants", "marathons", "origami", "castles", "lighthouses",
    "the human skeleton", "magnets", "pizza", "robots", "the rain cycle", "butterflies",
    "ancient Egypt", "the violin", "oceans tides", "solar panels", "sleep", "museums", "apples",
    "the periodic table", "deserts at night", "photography", "sharks", "cheese", "kites",
    "the stock market", "paper", "forests", "the camera", "bees and flowers", "the Sahara",
    "spiders", "volunteering", "the microscope", "rockets", "yoga", "the calendar",
]

TOPICS_HELDOUT = [
    "the sun", "octopuses", "the ancient Greeks", "plastic", "tennis", "lemons", "hurricanes",
    "submarines", "the Arctic", "frogs", "money", "the guitar", "wolves", "salt", "caves",
    "the compass", "tornadoes", "universities", "eagles", "soap",
]


def synthetic_prompts(n: int, heldout: bool = False, seed: int = 0) -> list[str]:
    """`n` distinct prompts (task x topic), shuffled with `seed`; train and held-out topics are disjoint."""
    topics = TOPICS_HELDOUT if heldout else TOPICS_TRAIN
    combos = [task.format(t=topic) for topic in topics for task in TASKS]
    if not 1 <= n <= len(combos):
        raise MatvlmError(f"synthetic{'-heldout' if heldout else ''}:N takes N from 1 to {len(combos)}, got {n}")
    random.Random(seed).shuffle(combos)
    return combos[:n]


def read_prompts(spec: str | Path) -> list[dict]:
    """Prompts as `[{"id": str, "messages": [...]}]` (the last message a user turn) from a file or a
    `synthetic:N` / `synthetic-heldout:N` spec (see the module doc)."""
    m = re.fullmatch(r"synthetic(-heldout)?:(\d+)", str(spec))
    if m:
        texts = synthetic_prompts(int(m.group(2)), heldout=bool(m.group(1)))
        return [{"id": f"{'h' if m.group(1) else 's'}{i}", "messages": [{"role": "user", "content": t}]}
                for i, t in enumerate(texts)]
    path = Path(spec)
    if not path.is_file():
        raise MatvlmError(f"prompt file {path} does not exist (expected .txt with one prompt a line, .jsonl, "
                          "or synthetic:N)")
    text = path.read_text(encoding="utf-8")
    # JSONL lines end at "\n" alone (str.splitlines would also cut inside text holding U+2028)
    lines = text.split("\n") if path.suffix == ".jsonl" else text.splitlines()
    out: list[dict] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise MatvlmError(f"{path} line {i}: not JSON ({e.msg})") from None
            has_id = isinstance(obj, dict) and obj.get("id") is not None
            out.append({"id": str(obj["id"]) if has_id else f"line-{i}", "messages": _messages(obj, f"{path} line {i}")})
    else:
        for line in lines:
            if line.strip() and not line.lstrip().startswith("#"):
                out.append({"id": str(len(out)), "messages": [{"role": "user", "content": line.strip()}]})
    if not out:
        raise MatvlmError(f"prompt file {path} holds no prompts")
    seen: dict[str, int] = {}
    for n, p in enumerate(out):
        if p["id"] in seen:
            raise MatvlmError(f"prompt file {path}: id {p['id']!r} is used twice (prompts {seen[p['id']] + 1} "
                              f"and {n + 1}); ids must be unique")
        seen[p["id"]] = n
    return out


def _messages(obj, where: str) -> list[dict]:
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and obj["prompt"].strip():
        return [{"role": "user", "content": obj["prompt"]}]
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    ok = (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                                                  and isinstance(m.get("content"), str) for m in msgs)
          and msgs[-1]["role"] == "user")
    if not ok:
        raise MatvlmError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [{{\"role\", \"content\"}}, ...]}} "
                          "ending with a user message")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]
