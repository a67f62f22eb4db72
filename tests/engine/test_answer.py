"""A request's answer decoded token by token (engine/answer.py): the same text as one full decode, for
byte-level BPE with characters split over tokens, for a SentencePiece-style decoder that drops the first
space, and for a tokenizer whose next token rewrites text already streamed; stop strings across pieces; and a
step's decode work that does not grow with the answer."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from matvlm.engine.answer import Answer, TextWindow, first_stop
from matvlm.engine.sampling import SamplingParams
from matvlm.toy.tiny import byte_tokenizer

TEXTS = ["Grüße aus Köln, 日本語のテキスト and emoji 🙂🙂 mixed.", "plain ascii, then é and ß at the end é",
         "🙂", "a  b\n\nc\tdone"]


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    words = ["▁the", "▁cat", "▁sat", "s", "▁on", "▁mat", ".", "▁", "ing", "<eos>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="▁"))
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _stream(tokenizer, ids):
    window, pieces = TextWindow(tokenizer), []
    for tok in ids:
        pieces.append(window.push(tok))
        assert tokenizer.decode(window.ids, skip_special_tokens=True).startswith(window.text)
    return window, pieces


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_pieces_join_to_the_full_decode(text):
    tok = byte_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) or text.isascii()          # multi-byte characters span several tokens
    window, pieces = _stream(tok, ids)
    assert "".join(pieces) == window.text == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)           # a split character is held back, never sent half


def test_metaspace_keeps_the_spaces_a_window_start_would_drop():
    tok = _metaspace_tokenizer()
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(9) for _ in range(rng.randrange(1, 30))]
        window, pieces = _stream(tok, ids)
        assert "".join(pieces) == window.text == tok.decode(ids)


class _Rewriting:
    """A tokenizer whose decode rewrites across tokens ("a" then "b" reads "X"): the next token changes text
    already streamed, as a clean-up rule on the joined string does."""

    def decode(self, ids, **kw):
        return "".join("abc "[i] for i in ids).replace("ab", "X")


def test_a_token_that_rewrites_streamed_text_resyncs_to_the_full_decode():
    tok, rng = _Rewriting(), random.Random(1)
    for _ in range(40):
        ids = [rng.randrange(4) for _ in range(rng.randrange(1, 25))]
        answer = Answer(tok, SamplingParams(max_new_tokens=10_000), eos_ids=set(), live=True)
        for n, t in enumerate(ids, 1):
            answer.accept(t)
            assert answer.text == tok.decode(ids[:n])
        assert answer.final_text() == tok.decode(ids)


def test_stop_string_split_over_pieces_cuts_before_it():
    tok = byte_tokenizer()
    ids = tok.encode("one two ### three", add_special_tokens=False)
    answer = Answer(tok, SamplingParams(max_new_tokens=100, stop=["##"]), eos_ids=set(), live=True)
    taken = 0
    for t in ids:
        taken += 1
        if answer.accept(t):
            break
    assert answer.reason == "stop" and answer.text == "one two " and answer.final_text() == "one two "
    assert taken == len("one two ##")                      # stopped at the token that completed it


def test_eos_and_stop_tokens_end_without_being_kept_length_counts_kept_tokens():
    tok = byte_tokenizer()
    eos = tok.eos_token_id
    a = Answer(tok, SamplingParams(max_new_tokens=3), eos_ids={eos}, live=False)
    assert [a.accept(t) for t in tok.encode("ab", add_special_tokens=False)] == [False, False]
    assert a.accept(eos) and a.reason == "stop" and a.ids == tok.encode("ab", add_special_tokens=False)
    b = Answer(tok, SamplingParams(max_new_tokens=3, ignore_eos=True), eos_ids={eos}, live=False)
    assert [b.accept(t) for t in [eos] + tok.encode("ab", add_special_tokens=False)] == [False, False, True]
    assert b.reason == "length" and b.text == "" and b.final_text() == "ab"   # not live: decoded once, at the end


def test_decode_work_per_token_does_not_grow_with_the_answer():
    class Counting:
        def __init__(self, inner):
            self.inner, self.decoded = inner, 0

        def decode(self, ids, **kw):
            self.decoded += len(ids)
            return self.inner.decode(ids, **kw)

    tok = Counting(byte_tokenizer())
    ids = tok.inner.encode("the quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    answer = Answer(tok, SamplingParams(max_new_tokens=10_000, stop=["never there"]), eos_ids=set(), live=True)
    for t in ids:
        answer.accept(t)
    assert answer.text == tok.inner.decode(ids)
    assert tok.decoded < 4 * len(ids)                       # a full re-decode per token would be n²/2 = 1.6M


def test_first_stop_finds_the_earliest_from_start():
    assert first_stop("ab##cd$$", ["$$", "##"]) == 2
    assert first_stop("ab##cd$$", ["$$", "##"], start=3) == 6
    assert first_stop("abc", ["", "x"]) is None
