"""Sampling: greedy, temperature, top-k, top-p, repetition penalty, per-request seeds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import MatvlmError


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 means greedy (top-k/top-p then do not matter)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise MatvlmError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MatvlmError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MatvlmError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MatvlmError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise MatvlmError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL-style penalty (arXiv 1909.05858): seen tokens' positive logits are divided by `penalty`,
    negative ones multiplied. logits: (V,), seen: (V,) bool."""
    if penalty == 1.0:
        return logits
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, scaled, logits)


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits with everything outside the top-k and outside the smallest set of probability mass >= top_p
    set to -inf. logits: (V,) float32."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs            # mass of the tokens ranked above each one
        drop = before >= top_p                                   # keep the minimal set reaching top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample_row(logits: Tensor, params: SamplingParams, seen: Tensor | None, generator: torch.Generator | None) -> int:
    """The next token of one sequence. logits: (V,) float32."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty) if seen is not None else logits
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
