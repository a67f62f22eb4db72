"""MM-Vet grading by a language model behind any OpenAI-compatible chat endpoint (a local
`matvlm serve`, vLLM, or a hosted API), standard library HTTP only.

MM-Vet's protocol (yuweihao/MM-Vet, mm-vet_evaluator.py, read for facts): a grader LLM reads the
question, the reference answer (with "<AND>" / "<OR>" marking answers of several parts) and the
prediction and returns a correctness mark in [0, 1] (steps of 0.1), at temperature 0; the first
word of its reply is the mark; an unreadable reply is asked again at a higher temperature (+0.5
each time). The score is the mean mark × 100, overall and per capability (mmvet.MMVet.score).
Published MM-Vet numbers come from GPT-4 (gpt-4-0613) with MM-Vet's own few-shot prompt, so a run
here is comparable to them only with that grader and that prompt: matvlm's default prompt is its
own wording, and ``comparable_to_published`` says False for it; for a prompt file matvlm cannot tell,
and says None.

    judge = load_judge("http://127.0.0.1:8000/v1", "my-model")
    mark = judge("What is x?", "5 <OR> five", "x is five")      # float in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from matvlm.errors import MatvlmError

PROMPT_NAME = "matvlm-mmvet-v1"
PROMPT = """You are grading an answer to a question about an image. You cannot see the image; judge \
only by comparing the answer with the reference.

Question: {question}
Reference: {answer}
Answer to grade: {prediction}

In the reference, "<AND>" joins parts that must all be present for full marks, and "<OR>" joins \
alternatives of which any one is enough. Give partial credit for answers that are partly right \
or right but incomplete. Reply with one number from 0.0 (wrong) to 1.0 (fully right) in steps of \
0.1, and nothing else."""
PLACEHOLDERS = ("{question}", "{answer}", "{prediction}")
_MARK = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


@dataclass
class LLMJudge:
    """A grader of one MM-Vet answer: (question, reference, prediction) -> mark in [0, 1].

    Attributes:
        url: the endpoint's API base ("http://host:8000/v1") or its full .../chat/completions URL.
        model: the model name sent in each request.
        prompt: template with {question}, {answer}, {prediction}; a template with none of them gets
            MM-Vet's table row "question | reference | prediction | " appended on a new line.
        prompt_name: what the results call the prompt (matvlm's own, or "file:<name> sha256:<hex>").
        api_key: sent as a Bearer token when given.
        tries: requests per answer before an unreadable reply is an error.
        max_tokens: reply budget (a mark needs a few tokens).
        timeout: seconds per request.
    """

    url: str
    model: str
    prompt: str = PROMPT
    prompt_name: str = PROMPT_NAME
    api_key: str | None = field(default=None, repr=False)
    tries: int = 3
    max_tokens: int = 8
    timeout: float = 120.0

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise MatvlmError(f"judge URL must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise MatvlmError("the judge needs a model name (--judge-model)")
        if self.tries < 1:
            raise MatvlmError(f"judge tries must be >= 1, got {self.tries}")

    @property
    def endpoint(self) -> str:
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def __call__(self, question: str, answer: str, prediction: str) -> float:
        content = render_prompt(self.prompt, question, answer, prediction)
        reply = ""
        for attempt in range(self.tries):
            reply = chat_completion(self.endpoint, self.model, content, self.api_key,
                                    temperature=0.5 * attempt, max_tokens=self.max_tokens, timeout=self.timeout)
            mark = parse_mark(reply)
            if mark is not None:
                return mark
        raise MatvlmError(f"judge {self.model} at {self.endpoint} gave no mark in [0, 1] in {self.tries} tries for "
                          f"question {question[:60]!r}; last reply {reply[:80]!r}")

    def describe(self) -> dict:
        """What the results record about this judge."""
        own = self.prompt_name == PROMPT_NAME
        return {"kind": "llm", "url": self.endpoint, "model": self.model, "prompt": self.prompt_name,
                "comparable_to_published": False if own else None,
                "note": ("matvlm's own grading prompt, not MM-Vet's: not comparable to published numbers" if own else
                         "comparable to published numbers only if the prompt file is MM-Vet's grader prompt and "
                         "the judge is its GPT-4 (gpt-4-0613)")}


def load_judge(url: str, model: str, prompt_file: Path | str | None = None, api_key_env: str | None = None,
               **options) -> LLMJudge:
    """An LLMJudge from command-line values: the prompt read from ``prompt_file`` (default: matvlm's),
    the API key from the environment variable ``api_key_env`` (which must be set when named)."""
    prompt, name = PROMPT, PROMPT_NAME
    if prompt_file is not None:
        path = Path(prompt_file)
        try:
            prompt = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MatvlmError(f"judge prompt file {path} cannot be read ({e}); expected a UTF-8 text file") from None
        if not prompt.strip():
            raise MatvlmError(f"judge prompt file {path} is empty; expected the grading prompt text")
        name = f"file:{path.name} sha256:{hashlib.sha256(prompt.encode()).hexdigest()[:16]}"
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise MatvlmError(f"environment variable {api_key_env} (--judge-api-key-env) is not set or empty")
    return LLMJudge(url, model, prompt, name, api_key, **options)


def render_prompt(template: str, question: str, answer: str, prediction: str) -> str:
    """The grading request: the template's placeholders filled, or MM-Vet's row appended. The
    reference's markers get spaces around them, as MM-Vet's evaluator writes them."""
    answer = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    if not any(p in template for p in PLACEHOLDERS):
        return template.rstrip("\n") + "\n" + " | ".join([question, answer, prediction, ""])
    for placeholder, value in zip(PLACEHOLDERS, (question, answer, prediction)):
        template = template.replace(placeholder, value)
    return template


def parse_mark(reply: str) -> float | None:
    """The mark a judge replied: the first number of the reply's first word, if within [0, 1]."""
    words = reply.strip().split()
    found = _MARK.match(words[0]) if words else None
    if found is None:
        return None
    mark = float(found.group(0))
    return mark if 0.0 <= mark <= 1.0 else None


def chat_completion(endpoint: str, model: str, content: str, api_key: str | None = None, temperature: float = 0.0,
                    max_tokens: int = 8, timeout: float = 120.0) -> str:
    """The text of one OpenAI-style chat completion for a single user message (POST ``endpoint``)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}],
                       "temperature": temperature, "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")[:200].replace("\n", " ")
        raise MatvlmError(f"judge {endpoint} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        raise MatvlmError(f"judge {endpoint} unreachable: {getattr(e, 'reason', e)}") from None
    try:
        return str(json.loads(raw)["choices"][0]["message"]["content"] or "")
    except (ValueError, KeyError, IndexError, TypeError):
        raise MatvlmError(f"judge {endpoint} did not answer an OpenAI chat completion "
                          f"(choices[0].message.content): {raw[:120]!r}") from None
