"""Scoring Shapes-VQA answers: tokenisation, normalisation, token F1 and per-type accuracy (`accuracy`)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Mapping

from .dataset import Sample
from .scene import PUNCT

_TOKEN_RE = re.compile(r"[a-z0-9]+|[?.,]")


# ----------------------------------------------------------------------------- scoring

def tokenize(text: str) -> list[str]:
    """Lower-cased words and the punctuation "?", ".", "," (everything else is dropped)."""
    return _TOKEN_RE.findall(text.lower())


def normalize(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and trailing punctuation."""
    return " ".join(text.lower().split()).rstrip(".?!,;: ")


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the word multisets (punctuation ignored)."""
    pred = [t for t in tokenize(prediction) if t not in PUNCT]
    ref = [t for t in tokenize(reference) if t not in PUNCT]
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def accuracy(predictions: Mapping[str, str], samples: Iterable[Mapping | Sample]) -> dict:
    """Exact-match accuracy of `predictions` (sample id -> answer text) on `samples`.

    A missing prediction counts as wrong. Returns {"overall", "n", "missing", "per_qtype":
    {qtype: accuracy}, "n_per_qtype": {qtype: count}, "describe_f1": mean token F1 over describe
    samples (None if there are none)}.
    """
    right, total, f1 = Counter(), Counter(), []
    missing = 0
    for s in samples:
        sid, qtype, ref = (s.id, s.qtype, s.answer) if isinstance(s, Sample) else (s["id"], s["qtype"], s["answer"])
        pred = predictions.get(sid)
        missing += pred is None
        pred = pred or ""
        total[qtype] += 1
        right[qtype] += normalize(pred) == normalize(ref)
        if qtype == "describe":
            f1.append(token_f1(pred, ref))
    n = sum(total.values())
    return {"overall": sum(right.values()) / n if n else 0.0, "n": n, "missing": missing,
            "per_qtype": {q: right[q] / total[q] for q in sorted(total)}, "n_per_qtype": dict(sorted(total.items())),
            "describe_f1": sum(f1) / len(f1) if f1 else None}
