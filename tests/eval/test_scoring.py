"""Answer normalisation and parsing (matvlm.eval.scoring): each case is a rule of a published scorer."""

import random

import pytest

from matvlm.eval.scoring import (infer_option, mme_yes_no, mmmu_gold, mmmu_open_correct, mmmu_parse_choice,
                                 mmmu_parse_open, normalize_evalai, normalize_gqa, normalize_vqa, pope_yes_no,
                                 soft_accuracy, sqa_letter, textvqa_accuracy, vqav2_accuracy)


@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"),                      # number words become digits
    ("the red car.", "red car"),       # articles and the final period go
    ("A dog!", "dog"),
    ("yes?", "yes"),
    ("coca-cola", "coca cola"),        # a hyphen inside a word becomes a space ...
    ("coca - cola", "coca cola"),      # ... and one beside a space is deleted
    ("1,000", "1000"),                 # EvalAI drops commas first
    ("3.5 m", "3.5 m"),                # a period before a digit stays
    ("dont", "don't"),                 # contractions restored
    ("couldnt've", "couldn't've"),
    ("none", "0"),
    ("  Line\nbreak\t", "line break"),
])
def test_normalize_evalai(raw, expected):
    assert normalize_evalai(raw) == expected


def test_normalize_vqa_keeps_commas_between_digits_and_apostrophes_s():
    # vqaEval.py's own processing has no comma / "'s" step: a digit,digit comma deletes the marks
    assert normalize_vqa("1,000 cats") == "1000 cats"
    assert normalize_vqa("the man's hat") == "man's hat"
    assert normalize_evalai("the man's hat") == "man 's hat"


def test_soft_accuracy_averages_the_ten_leave_one_out_subsets():
    # 3 of 10 humans agree with the prediction: min(#/3, 1) alone would give 1.0; the official
    # average over the 10 subsets of 9 gives (3 · 2/3 + 7 · 1) / 10 = 0.9.
    assert soft_accuracy("cat", ["cat"] * 3 + ["dog"] * 7) == pytest.approx(0.9)
    assert soft_accuracy("cat", ["cat"] * 4 + ["dog"] * 6) == pytest.approx(1.0)
    assert soft_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)   # (0 + 9 · 1/3) / 10
    assert soft_accuracy("fish", ["cat"] * 10) == 0.0


def test_textvqa_accuracy_normalises_both_sides():
    # "Two." and "two" both become "2": 2 matching humans -> (2 · 1/3 + 8 · 2/3) / 10 = 0.6
    answers = ["two", "2"] + ["3"] * 8
    assert textvqa_accuracy("Two.", answers) == pytest.approx(0.6)
    # "Coca-Cola" -> "coca cola" == "the coca cola" -> "coca cola": 3 humans -> 0.9
    assert textvqa_accuracy("Coca-Cola", ["the coca cola"] * 3 + ["coke"] * 7) == pytest.approx(0.9)


def test_vqav2_accuracy_follows_the_official_evaluator():
    # humans disagree: both sides normalised ("two" -> "2"), 4 matches -> 1.0
    assert vqav2_accuracy("Two", ["2", "2", "2", "two"] + ["3"] * 6) == pytest.approx(1.0)
    # humans agree: exact match, but LLaVA's submission step has already normalised "Yes." to "yes"
    assert vqav2_accuracy("Yes.", ["yes"] * 10) == pytest.approx(1.0)
    assert vqav2_accuracy("dogs", ["dog"] * 10) == 0.0


@pytest.mark.parametrize("raw,expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No.", "no"),
    ("Not really", "no"),              # "no" inside the first 4 characters
    ("The answer is yes", "other"),    # neither in the first 4 characters: wrong either way
    ("", "other"),
])
def test_mme_yes_no(raw, expected):
    assert mme_yes_no(raw) == expected


@pytest.mark.parametrize("raw,expected", [
    ("Yes, there is a dog.", "yes"),
    ("No, there is no dog.", "no"),
    ("There is not a cat in the image.", "no"),
    ("There is a cat. No dog.", "yes"),       # only the first sentence counts
    ("I don't think so", "yes"),              # "don't" is not one of No/no/not
    ("NO", "yes"),                            # case matters in eval_pope.py
    ("", "yes"),
])
def test_pope_yes_no(raw, expected):
    assert pope_yes_no(raw) == expected


@pytest.mark.parametrize("raw,n,expected", [
    ("B", 3, "B"),
    ("B. dog", 3, "B"),
    ("The answer is C.", 3, "C"),
    ("b", 3, None),                           # lower case is not parsed
    ("B.", 3, None),                          # needs ". " after the letter
    ("D", 3, None),                           # no fourth option
    ("The answer is A. The answer is B.", 3, None),   # two "The answer is" -> ambiguous
])
def test_sqa_letter(raw, n, expected):
    assert sqa_letter(raw, n) == expected


OPTIONS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize("raw,expected", [
    ("B", "B"), ("(C)", "C"), ("A.", "A"), ("The answer is C", "C"),
    ("The answer is A", "A"),                 # VLMEvalKit's default keeps a bare "A" near the end
    ("B.cat", "B"), ("(B)cat", "B"),          # its marks become spaces, not nothing
    ("B:dog", "B"), ("**C**", "C"), ("[A]", "A"),
    ('"B"', None),                            # quotes are not among its marks; '"b"' is no option text
    ("A dog is sitting there", None),         # the letter is not among the last 4 words; answer too long for texts
    ("It is a bird", "C"),                    # no letter: the one option text it holds
    ("A or B", None),                         # two letters named and no option text
    ("D", None),                              # not an option
    ("cat and dog", None),                    # two option texts
    ("Z", "Z"), ("I think Z.", "Z"),          # "Z" alone: none of the options
    ("Cannot determine the answer", "Z"),     # one of its refusal texts
    ("Failed to obtain answer via API", None),
    ("B is my guess but the correct answer is **C**", "C"),   # B too early; "answer is X" names C
    ("the answer is c", "C"),                 # that pattern ignores case
    ("A, B or C, all of them maybe", None),   # several letters and no single option text
    ("dog", "B"), ("DOG!", "B"),              # option texts ignore case
    ("a very long answer that mentions a dog somewhere", None),   # longer than twice the option texts
])
def test_infer_option_follows_vlmevalkit_default(raw, expected):
    assert infer_option(raw, OPTIONS) == expected


@pytest.mark.parametrize("raw,expected", [
    ("(B)", "B"),
    ("B", "B"),
    ("The answer is C.", "C"),
    ("(A) is wrong, the right one is (C)", "C"),          # several bracketed: the last one
    ("I believe the correct choice here is a small bird", "C"),  # > 5 words: option text
])
def test_mmmu_parse_choice(raw, expected):
    assert mmmu_parse_choice(raw, OPTIONS, random.Random(0)) == expected


def test_mmmu_parse_choice_draws_with_the_given_generator_when_nothing_parses():
    draws = [mmmu_parse_choice("hmm", OPTIONS, rng) for rng in (random.Random(42), random.Random(42))]
    assert draws[0] == draws[1] == random.Random(42).choice(list(OPTIONS))


def test_mmmu_open_answers():
    assert mmmu_open_correct("3.14", mmmu_parse_open("x is approximately 3.14159"))   # numbers round to 2 places
    assert mmmu_open_correct("1000", mmmu_parse_open("The total is 1,000."))
    assert not mmmu_open_correct("3.14", mmmu_parse_open("x is 3.2"))
    assert mmmu_open_correct("Paris", mmmu_parse_open("The capital is Paris"))
    assert not mmmu_open_correct("a", mmmu_parse_open("banana"))   # one letter must stand alone
    assert mmmu_open_correct(["24/7", "3.429"], mmmu_parse_open("so the ratio = 3.429"))
    assert mmmu_gold("['24/7', '3.429']") == ["24/7", "3.429"]
    assert mmmu_gold("B") == "B"


@pytest.mark.parametrize("raw,expected", [("Yes.", "yes"), (" Left", "left"), ("the table", "the table")])
def test_normalize_gqa(raw, expected):
    assert normalize_gqa(raw) == expected
