"""Token helpers shared by every path that turns text into ids: templated segments to ids with
answer-only labels (one tokenisation of the whole text, as the processor does), the image placeholder's
id and its expansion to the image tokens, truncation, and BOS detection.

Tokenisation: with a fast tokenizer (the usual case) the whole templated text is tokenised once,
as the processor does, and a token is an answer token when its character span overlaps an answer
piece. This keeps ids identical to the processor's for every tokenizer, including SentencePiece
ones whose ids change when text is cut into pieces (LLaVA needs per-tokenizer length corrections
for that). Tokenizers that cannot report offsets tokenise piece by piece and concatenate.
"""

from __future__ import annotations

import torch

from ..errors import MatvlmError
from .templates import IMAGE_PLACEHOLDER

IGNORE_INDEX = -100


def tokenizer_of(processor_or_tokenizer):
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def image_token_id(processor_or_tokenizer) -> int:
    """The id of the image placeholder: one token, or a MatvlmError."""
    tok = tokenizer_of(processor_or_tokenizer)
    token = getattr(processor_or_tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    ids = tok.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise MatvlmError(f"the tokenizer splits the image placeholder {token!r} into {len(ids)} tokens; "
                          "expected one token (a VLM tokenizer with the image token added)")
    return ids[0]


def _answer_chars(segments: list[tuple[str, bool]]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for text, is_answer in segments:
        if is_answer:
            spans.append((pos, pos + len(text)))
        pos += len(text)
    return spans


def has_own_bos(tok, text: str) -> bool:
    """A text that already starts with the BOS token (a chat template that writes `{{ bos_token }}`):
    the tokenizer must not add another."""
    return bool(getattr(tok, "bos_token", None)) and text.startswith(tok.bos_token)


def _encode_with_offsets(tok, segments) -> tuple[list[int], list[bool]]:
    text = "".join(t for t, _ in segments)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=not has_own_bos(tok, text))
    in_answer = [False] * (len(text) + 1)
    for a, b in _answer_chars(segments):
        in_answer[a:b] = [True] * (b - a)
    mask = [e > s and any(in_answer[s:e]) for s, e in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def _encode_by_segment(tok, segments) -> tuple[list[int], list[bool]]:
    ids, mask = [], []
    for text, is_answer in segments:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [is_answer] * len(piece)
    if hasattr(tok, "build_inputs_with_special_tokens") and not has_own_bos(tok, "".join(t for t, _ in segments)):
        # BOS/EOS the tokenizer adds around a text
        marked = tok.build_inputs_with_special_tokens([-1])
        k = marked.index(-1)
        ids = marked[:k] + ids + marked[k + 1:]
        mask = [False] * k + mask + [False] * (len(marked) - k - 1)
    return ids, mask


def encode_segments(segments: list[tuple[str, bool]], processor_or_tokenizer,
                    n_image_tokens: int = 0, by_segment: bool | None = None,
                    images: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels of templated pieces.

    Args:
        segments: `(text, is_answer)` pieces from `ChatTemplate.segments`.
        n_image_tokens: copies the image placeholder expands to (0: the text must hold none).
        by_segment: force piece-by-piece tokenisation (default: only when offsets are unavailable).
        images: whether the image placeholder is reserved (VLM data); for a text model it is ordinary text.
    Returns:
        input_ids (T,) and labels (T,), int64; labels are -100 except on answer tokens.
    """
    tok = tokenizer_of(processor_or_tokenizer)
    token = getattr(processor_or_tokenizer, "image_token", None) or IMAGE_PLACEHOLDER
    if token != IMAGE_PLACEHOLDER:  # a processor whose image token is spelt differently
        segments = [(t.replace(IMAGE_PLACEHOLDER, token), a) for t, a in segments]
    if by_segment is None:
        by_segment = not getattr(tok, "is_fast", False)
    ids, mask = (_encode_by_segment if by_segment else _encode_with_offsets)(tok, segments)
    if images and (n_image_tokens or token in "".join(t for t, _ in segments)):
        ids, mask = _expand_image(ids, mask, image_token_id(processor_or_tokenizer), n_image_tokens)
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = torch.where(torch.tensor(mask, dtype=torch.bool), input_ids, IGNORE_INDEX)
    return input_ids, labels


def _expand_image(ids: list[int], mask: list[bool], image_id: int, n: int) -> tuple[list[int], list[bool]]:
    at = [i for i, t in enumerate(ids) if t == image_id]
    if len(at) != (1 if n else 0):
        raise MatvlmError(f"the templated text holds {len(at)} image tokens; expected {1 if n else 0}")
    if not n:
        return ids, mask
    p = at[0]
    return ids[:p] + [image_id] * n + ids[p + 1:], mask[:p] + [False] * n + mask[p + 1:]


def truncate(input_ids: torch.Tensor, labels: torch.Tensor, max_length: int,
             image_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Cut (T,) ids and labels to `max_length` from the end; None when the cut would remove an image
    token (an image cut in half cannot be fed to the model) or leave no label to learn."""
    if len(input_ids) <= max_length:
        return input_ids, labels
    ids, lab = input_ids[:max_length], labels[:max_length]
    if image_id is not None and (input_ids[max_length:] == image_id).any():
        return None
    if (lab == IGNORE_INDEX).all():
        return None
    return ids, lab
