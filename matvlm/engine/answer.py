"""One request's answer as it is generated, shared by the static batch (`engine._Decoding`) and the
continuous batcher (`scheduler`): which tokens it took, why it stopped, and its text.

The text is decoded incrementally: each step decodes a window of a few tokens instead of the whole answer
(re-decoding it all made a step's host work grow with the answer's length, about 95 µs per 512-token
answer per step). The final text is one full decode of the tokens, so it is exactly what
`tokenizer.decode` gives, whatever the streamed pieces were.
"""

from __future__ import annotations

from torch import Tensor

from .sampling import SamplingParams


def first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the earliest stop string begins in `text[start:]` (as an index into `text`), or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class TextWindow:
    """The text of a growing token list, decoded a little at a time.

    Two offsets split the tokens: those before `base` are settled, their text fixed; `base:read` are
    tokens whose text was already handed out but which stay in the window as context, because a token's
    text can depend on its neighbours (a leading-space marker dropped at the start of a decode, a
    character whose bytes span tokens). Each new token decodes `base:read` and `base:end`; the longer
    decode's extra text is the new piece, held back while it ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.base = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, tok: int) -> str:
        """Add one token; returns the text it completes ('' while a piece is pending)."""
        self.ids.append(tok)
        before = self._decode(self.ids[self.base:self.read])
        after = self._decode(self.ids[self.base:])
        if not after.startswith(before):      # the new token changed text already handed out (a clean-up
            text = self.full()                 # rule of the tokenizer): take the whole decode, once
            if text.endswith("\ufffd"):
                return ""
            piece = text[len(self.text):] if text.startswith(self.text) else ""
            self.text = text
        elif len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        else:
            piece = after[len(before):]
            self.text += piece
        self.base, self.read = self.read, len(self.ids)
        return piece

    def full(self) -> str:
        return self._decode(self.ids)


class Answer:
    """What one request has generated. `accept(token)` takes the next sampled token and says whether the
    request is done: an end-of-sequence or stop token (not kept), a stop string (the text is cut before
    it), or `max_new_tokens`. The text is followed token by token only when `live` (streamed, or stop
    strings to look for); otherwise it is decoded once at the end. `seen` (a vocab-size bool row, for the
    repetition penalty) is marked with each kept token."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids, live: bool, seen: Tensor | None = None):
        self.params, self.eos_ids, self.live, self.seen = params, eos_ids, live, seen
        self.window = TextWindow(tokenizer)
        self.reason = "length"
        self.done = False
        self._longest_stop = max((len(s) for s in params.stop), default=0)

    @property
    def ids(self) -> list[int]:
        return self.window.ids

    @property
    def text(self) -> str:
        """The text so far (what has been streamed); empty until the end when not `live`."""
        return self.window.text

    def accept(self, tok: int) -> bool:
        if self.done:
            return True
        p = self.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self.done, self.reason = True, "stop"
            return True
        if self.seen is not None:
            self.seen[tok] = True
        if self.live:
            old = len(self.window.text)
            self.window.push(tok)
            if p.stop:
                start = max(0, min(old, len(self.window.text)) - self._longest_stop + 1)
                cut = first_stop(self.window.text, p.stop, start)
                if cut is not None:
                    self.window.text = self.window.text[:cut]
                    self.done, self.reason = True, "stop"
                    return True
        else:
            self.window.ids.append(tok)
        self.done = len(self.ids) >= p.max_new_tokens
        return self.done

    def final_text(self) -> str:
        """The answer's text: one full decode of its tokens, cut before the first stop string."""
        text = self.window.full()
        cut = first_stop(text, self.params.stop)
        return text if cut is None else text[:cut]
