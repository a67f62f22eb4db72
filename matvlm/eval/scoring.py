"""Answer normalisation and parsing used by the benchmark scorers: pure functions, strings in.

Each function reproduces one published scorer's rule (named in its docstring) so that a number
computed here is the number that scorer would print. Sources, read and re-implemented:

- EvalAI / VQA answer processing: the official VQA evaluator (GT-Vision-Lab/VQA, 2021 version of
  ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) and MMF's ``EvalAIAnswerProcessor`` as shipped
  in LLaVA's ``llava/eval/m4c_evaluator.py`` (the TextVQA scorer of LLaVA, TinyLLaVA and MaTVLM).
- MME: ``eval_tool/calculation.py`` of the MME release (BradyFU/Awesome-Multimodal-Large-Language-Models,
  branch Evaluation).
- POPE: LLaVA's ``llava/eval/eval_pope.py``.
- ScienceQA: LLaVA's ``llava/eval/eval_science_qa.py``.
- MMBench: VLMEvalKit's ``can_infer_option`` / ``can_infer_text`` (exact-matching mode), at commit
  2cf2a36c6e79b51faf676a7011b3a0f5b579814d of ``vlmeval/utils/matching_util.py``.
- MMMU: ``mmmu/utils/eval_utils.py`` of MMMU-Benchmark/MMMU.
"""

from __future__ import annotations

import ast
import random
import re
from collections.abc import Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# VQA answer normalisation
# ---------------------------------------------------------------------------------------------

# The contraction table of the VQA evaluator / MMF, written as its contracted forms. Each form is
# reached from its spelling without apostrophes; forms with several apostrophes are reached from the
# spellings that drop exactly one of them ("couldnt've", "couldn'tve" -> "couldn't've"), which is
# how the published table is filled (it has no "couldntve").
_CONTRACTED = """
'ow's'at 'twas I'd've I'm I've ain't aren't can't could've couldn't couldn't've didn't doesn't
don't hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's isn't it'd it'd've
it'll ma'am might've mightn't mightn't've must've mustn't needn't not've o'clock oughtn't shan't
she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd
there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've weren't
what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've y'all'll you'd you'd've
you'll you're you've
""".split()


def _contraction_map() -> dict[str, str]:
    """{spelling with an apostrophe left out -> contracted form}, e.g. "dont" -> "don't"."""
    table = {}
    for form in _CONTRACTED:
        pos = [i for i, ch in enumerate(form) if ch == "'"]
        keys = [form.replace("'", "")] if len(pos) == 1 else [form[:i] + form[i + 1:] for i in pos]
        table.update(dict.fromkeys(keys, form))
    table["somebody'd"] = "somebodyd"  # sic, in the published table
    return table


_CONTRACTIONS = _contraction_map()
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_MARKS = tuple(';/[]"{}()=+\\_-><@`,?!')  # vqaEval.py punct == m4c_evaluator.py PUNCTUATIONS
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Published as "(?!<=\d)(\.)(?!\d)": its first look-around never fires, so a period is dropped unless a
# digit follows; both scorers pass re.UNICODE (= 32) as the count, so at most 32 go.
_PERIOD = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    """The evaluators' processPunctuation: a mark touching a space (or any mark, when the text has a
    digit,digit comma) is deleted, any other becomes a space; then periods not before a digit go."""
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _MARKS:
        spaced = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if glued or spaced else " ")
    return _PERIOD.sub("", out, count=32)


def _digits_articles(text: str) -> str:
    """The evaluators' processDigitArticle: lower-case words, number words -> digits ("two" -> "2"),
    articles dropped, known contractions restored ("dont" -> "don't")."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _one_line(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_evalai(answer: str) -> str:
    """An answer as MMF's EvalAIAnswerProcessor writes it (LLaVA's m4c_evaluator.py, used for
    TextVQA): lower case, "," and "?" removed, "'s" split off, punctuation, digits, articles."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_strip_punctuation(_one_line(text)))


def normalize_vqa(answer: str) -> str:
    """An answer as the official VQA evaluator (vqaEval.py) processes it when the humans disagree:
    one line, punctuation, then digits, articles and contractions."""
    return _digits_articles(_strip_punctuation(_one_line(answer)))


def soft_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one already-normalised prediction against N human answers, in [0, 1]:
    the mean, over the N subsets that leave one human out, of min(1, #humans in it who gave the
    prediction / 3) (the "10 choose 9" average of vqaEval.py and m4c_evaluator.py)."""
    if not answers:
        raise ValueError("soft_accuracy needs at least one human answer")
    matches = sum(a == prediction for a in answers)
    per_subset = [min(1.0, (matches - (a == prediction)) / 3) for a in answers]
    return sum(per_subset) / len(per_subset)


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA accuracy in [0, 1]: prediction and every human answer through normalize_evalai,
    then soft_accuracy (per LLaVA's m4c_evaluator.py TextVQAAccuracyEvaluator)."""
    return soft_accuracy(normalize_evalai(prediction), [normalize_evalai(a) for a in answers])


def vqav2_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] along LLaVA's / MaTVLM's path: the prediction is first written as
    normalize_evalai writes it (scripts/convert_vqav2_for_submission.py), then scored as the official
    evaluator does (vqaEval.py, 2021 version): when the human answers are not all the same, both
    sides go through normalize_vqa; when they all agree, the match is exact."""
    prediction = _one_line(normalize_evalai(prediction))
    answers = [_one_line(a) for a in answers]
    if len(set(answers)) > 1:
        prediction, answers = normalize_vqa(prediction), [normalize_vqa(a) for a in answers]
    return soft_accuracy(prediction, answers)


def normalize_gqa(answer: str) -> str:
    """A GQA prediction as LLaVA's scripts/convert_gqa_for_eval.py writes it (trailing periods
    stripped, lower case); GQA's eval.py then needs an exact string match, articles included."""
    return answer.strip().rstrip(".").lower().strip()


# ---------------------------------------------------------------------------------------------
# Yes / no
# ---------------------------------------------------------------------------------------------


def mme_yes_no(answer: str) -> str:
    """'yes', 'no' or 'other', per MME's calculation.py: the lower-cased answer itself when it is
    "yes" or "no", else "yes" if its first 4 characters contain "yes", else "no" if they contain
    "no" ("Not sure" -> "no"), else "other" (which counts as wrong)."""
    text = answer.strip().lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def pope_yes_no(answer: str) -> str:
    """'yes' or 'no', per LLaVA's eval_pope.py: keep the first sentence (up to the first "."), drop
    commas, and answer "no" when a space-separated word is "No", "no" or "not"; anything else,
    the empty answer included, is "yes"."""
    words = answer.split(".")[0].replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------

_SQA_LETTERS = ("A", "B", "C", "D", "E")  # eval_science_qa.py --options
_SQA_THE_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def sqa_letter(answer: str, n_choices: int) -> str | None:
    """The option letter of a ScienceQA answer, per LLaVA's eval_science_qa.py, or None: the answer
    is a letter ("B"), starts with a letter and ". " ("B. dog"), or holds exactly one "The answer is
    X." ; the letter must name one of the n_choices options. Case matters ("b" -> None)."""
    text = answer.strip()
    if text in _SQA_LETTERS:
        letter = text
    elif len(text) >= 3 and text[0] in _SQA_LETTERS and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _SQA_THE_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter and letter in _SQA_LETTERS[:n_choices] else None


# VLMEvalKit vlmeval/utils/matching_util.py at commit 2cf2a36c6e79b51faf676a7011b3a0f5b579814d (its latest
# change, June 2026): these marks become spaces before the answer is cut into words ...
_OPTION_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
# ... an answer holding one of these texts is a refusal, read as "Z" (none of the options) ...
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_API_FAILURE = "Failed to obtain answer via API"
# ... and a chain-of-thought answer may name its letter as "(the correct) answer is **B**", any case.
_ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)


def infer_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option an MMBench answer names: a letter of ``options``, "Z" (a refusal, or "Z" alone: none
    of them), or None (nothing inferred; VLMEvalKit's exact-matching mode then records "Z"). Both of
    the last two count as wrong.

    A re-statement of VLMEvalKit's default matching, can_infer = can_infer_option, else
    can_infer_text (vlmeval/utils/matching_util.py, commit 2cf2a36c6e79b51faf676a7011b3a0f5b579814d),
    with the VERBOSE environment variable unset (its default); not a copy of its code.

    Args:
        answer: the model's text.
        options: {letter: option text} of the options shown ("A".."D").

    1. "Failed to obtain answer via API" -> None; one of VLMEvalKit's four refusal texts -> "Z".
    2. Letters: ".()[],:;!*#{}" become spaces and the answer is cut at whitespace. Exactly one option
       letter among the words, and its first occurrence among the last four words -> that letter
       ("The answer is A" -> A, "B.cat" -> B); no letter but a word "Z" -> "Z".
    3. Otherwise "(correct) answer is X" (any case, X in A-D, "**" allowed around it) -> X if an option.
    4. Option texts, only for answers at most twice as long as all option texts together: exactly one
       option text (lower case) inside the lower-cased answer -> it.
    """
    text = str(answer)
    if _API_FAILURE in text:
        return None
    if any(refusal in text for refusal in _REFUSALS):
        return "Z"
    words = text.translate(_OPTION_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return named[0]
    if not named and "Z" in words:
        return "Z"
    said = _ANSWER_IS.search(text)
    if said and said.group(1).upper() in options:
        return said.group(1).upper()
    return _infer_option_text(text, options)


def _infer_option_text(answer: str, options: Mapping[str, str]) -> str | None:
    """Step 4 of infer_option (VLMEvalKit's can_infer_text)."""
    if len(answer) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    said = answer.lower()
    hits = [letter for letter, option in options.items() if str(option).lower() in said]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------
# MMMU
# ---------------------------------------------------------------------------------------------


def mmmu_parse_choice(answer: str, options: Mapping[str, str], rng: random.Random) -> str:
    """The option letter of an MMMU multiple-choice answer, per MMMU's parse_multi_choice_response.

    Args:
        answer: the model's text.
        options: {letter: option text}, letters "A", "B", ... in order.
        rng: draws a letter when nothing can be parsed (MMMU seeds it with 42).

    Candidates, in order of preference: "(X)" spellings; " X " as a word; when the answer has more
    than 5 words, option texts it contains. One candidate -> it; several -> the one that occurs
    last; none -> rng.choice(letters).
    """
    text = answer
    for ch in ",.!?;:'":
        text = text.strip(ch)
    text = f" {text} "
    letters = list(options)
    bracketed = [c for c in letters if f"({c})" in text]
    spaced = [c for c in letters if f" {c} " in text]
    by_content = [c for c in letters if len(text.split()) > 5 and str(options[c]).lower() in text.lower()]
    if bracketed:
        candidates, where = bracketed, lambda c: text.rfind(f"({c})")
    elif spaced:
        candidates, where = spaced, lambda c: text.rfind(f" {c} ")
    elif by_content:
        candidates, where = by_content, lambda c: text.lower().rfind(str(options[c]).lower())
    else:
        return rng.choice(letters)
    return max(candidates, key=lambda c: (where(c), -candidates.index(c)))


_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # 1,234,567
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # 1.5e-3
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # 12, 3.5, .5
)
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _mmmu_normalize(text: str) -> list[str | float]:
    """MMMU's normalize_str: a number (commas allowed) -> [float rounded to 2 places]; a single
    character c -> [" c", "c "] (so it cannot match inside a word); other text -> [lower case]."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        text = text.lower()
        return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_responses(answer: str) -> list[str]:
    """MMMU's get_key_subresponses: per sentence, the shortest tail after an indicator word
    ("is ", "so ", "answer ", ...; "=" too in the last sentence); the whole answer if none."""
    text = answer.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", text)
    keys = []
    for i, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        shortest = None  # MMMU's update rule, kept as is: an empty tail is replaced by the next one
        for indicator in (ind for ind in indicators if ind in sentence):
            tail = sentence.split(indicator)[-1].strip()
            if not shortest or len(tail) < len(shortest):
                shortest = tail
        if shortest and shortest not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [text]


def mmmu_parse_open(answer: str) -> list[str | float]:
    """The normalised candidate answers of an MMMU open question, per MMMU's parse_open_response:
    the key sub-responses and every number found in them, each through MMMU's normalize_str."""
    keys = _key_responses(answer)
    found = list(keys)
    for key in keys:
        for pattern in _NUMBER_PATTERNS:
            found.extend(pattern.findall(key))
    out = []
    for item in found:
        for norm in _mmmu_normalize(item):
            if norm not in out:
                out.append(norm)
    return out


def mmmu_open_correct(gold: str | Sequence[str], candidates: Sequence[str | float]) -> bool:
    """MMMU's eval_open: a numeric candidate must equal a normalised gold number; a text candidate
    must contain a normalised gold text."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    normalised = [g for answer in golds for g in _mmmu_normalize(answer)]
    for cand in candidates:
        if isinstance(cand, str):
            if any(isinstance(g, str) and g in cand for g in normalised):
                return True
        elif cand in normalised:
            return True
    return False


def mmmu_gold(answer: str) -> str | list[str]:
    """An MMMU answer field: a few open answers are a list written as a string ("['24/7', '3.429']")."""
    text = str(answer).strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, list):
            return [str(v) for v in value]
    return text
