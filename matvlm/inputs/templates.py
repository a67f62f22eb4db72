"""Chat templates: a conversation as text pieces, each marked as answer (learnt) or context.

A template turns `[(question, answer), ...]` into the exact string the teacher was trained on.
Training uses `segments` (the pieces with an `is_answer` flag, so labels can cover only the
answers and the end-of-turn marker after each); inference uses `prompt` (the conversation so
far, ending with the assistant cue). The two agree: the prompt of a conversation is the text of
its segments up to the last answer, so what the model is asked at inference is what preceded an
answer in training.

The answer piece starts with the separator between the cue and the answer (" " after
"ASSISTANT:"): byte-pair tokenizers merge that space into the answer's first token, so the
answer's first token is learnt whole, as in TinyLLaVA and LLaVA, where the prompt ends at
"ASSISTANT:" and the model generates " answer...".

Templates (facts read from upstream, code our own):
  phi     TinyLLaVA-Phi-2's (per TinyLLaVA_Factory tinyllava/data/template/phi_template.py and
          base.py): `system + " "`, per turn `"USER: " + q + " "` then `"ASSISTANT: " + a +
          "<|endoftext|>"`; prompt ends with "ASSISTANT:" (formatter.py writes the role and colon
          when the answer is None).
  vicuna  LLaVA-1.5 `conv_vicuna_v1` (per haotian-liu/LLaVA llava/conversation.py,
          SeparatorStyle.TWO, sep " ", sep2 "</s>"), which is also TinyLLaVA's `llama` template.
  chatml  Qwen2 (per Qwen2-Instruct's tokenizer chat template and LLaVA-NeXT's CHATML style):
          `<|im_start|>{role}\\n{text}<|im_end|>\\n`, default system "You are a helpful
          assistant.". (TinyLLaVA's `qwen2_instruct` template is instead phi's with "<|im_end|>";
          that is `get_template("phi").with_end_of_turn("<|im_end|>")`.)
  plain   no system prompt, `"USER: " + q + "\\n"`, `"ASSISTANT: " + a + eos + "\\n"`: the chat
          template of matvlm's toy tokenizer (`matvlm.toy.tiny.CHAT_TEMPLATE`); its eos is a
          parameter of `get_template("plain", eos_token=...)`.

Image placement (all templates): the image placeholder goes once, at the start of the first user
turn, as `"<image>\\n" + question` after removing any "<image>" from the question and stripping
it (per LLaVA llava/train/train.py `preprocess_multimodal` and TinyLLaVA base.py `_prompt`); an
image-only question becomes just "<image>".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import MatvlmError

IMAGE_PLACEHOLDER = "<image>"

# per LLaVA conv_vicuna_v1 and TinyLLaVA_Factory phi_template.py / llama_template.py (same text)
LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")
QWEN2_SYSTEM = "You are a helpful assistant."  # per Qwen2-Instruct's chat template


@dataclass(frozen=True)
class ChatTemplate:
    """How one model family writes a conversation.

    The text of a conversation is
      [system_prefix + system + system_suffix]            (left out when the system prompt is "")
      per turn: user_prefix + question + user_suffix + assistant_cue
                + answer_prefix + answer + end_of_turn + turn_suffix
    where the question of the first turn carries the image placeholder when there is an image.
    `answer_prefix + answer + end_of_turn` is the learnt part of each turn.
    """

    name: str
    system: str = ""
    system_prefix: str = ""
    system_suffix: str = " "
    user_prefix: str = "USER: "
    user_suffix: str = " "
    assistant_cue: str = "ASSISTANT:"
    answer_prefix: str = " "
    end_of_turn: str = "</s>"
    turn_suffix: str = ""
    image_placeholder: str = IMAGE_PLACEHOLDER
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.end_of_turn:
            raise MatvlmError(f"template {self.name!r}: end_of_turn must be a non-empty string")
        if not self.stop_strings:
            object.__setattr__(self, "stop_strings", (self.end_of_turn,))

    def with_end_of_turn(self, end_of_turn: str) -> "ChatTemplate":
        """A copy that ends each answer with `end_of_turn` (and stops there)."""
        return dataclasses.replace(self, end_of_turn=end_of_turn, stop_strings=(end_of_turn,))

    def segments(self, turns: list[tuple[str, str]], has_image: bool,
                 system: str | None = None) -> list[tuple[str, bool]]:
        """The whole conversation as `(text, is_answer)` pieces, in order (training).

        Args:
            turns: `[(question, answer), ...]`, at least one, every answer a string.
            has_image: put the image placeholder at the start of the first question.
            system: system prompt replacing the template's own ("" for none).
        Returns:
            pieces whose texts concatenate to the conversation; `is_answer` is True exactly for
            `answer_prefix + answer + end_of_turn` of each turn. Adjacent pieces of the same kind
            are merged.
        """
        if not turns:
            raise MatvlmError("a conversation needs at least one (question, answer) turn")
        if any(a is None for _, a in turns):
            raise MatvlmError("training conversations need an answer in every turn; "
                              "use prompt() for a conversation that ends with a question")
        return _merge(self._pieces(turns, has_image, system))

    def prompt(self, turns: list[tuple[str, str | None]], has_image: bool, system: str | None = None) -> str:
        """The conversation so far, ending with the assistant cue (inference).

        Args:
            turns: `[(question, answer), ..., (question, None)]`: earlier turns are answered,
                the last one is the question to answer now.
        Returns:
            the prompt text; a model continues it with `answer_prefix + answer + end_of_turn`.
        """
        if not turns or turns[-1][1] is not None:
            raise MatvlmError("prompt() needs turns ending with (question, None)")
        if any(a is None for _, a in turns[:-1]):
            raise MatvlmError("prompt(): only the last turn may be unanswered")
        return "".join(text for text, _ in self._pieces(turns, has_image, system))

    def _pieces(self, turns, has_image: bool, system: str | None):
        system = self.system if system is None else system
        if system:
            yield self.system_prefix + system + self.system_suffix, False
        for i, (question, answer) in enumerate(turns):
            question = self._place_image(question, has_image and i == 0, where=f"turn {i}")
            yield self.user_prefix + question + self.user_suffix + self.assistant_cue, False
            if answer is None:
                return
            if self.image_placeholder in answer:
                raise MatvlmError(f"turn {i}: the answer contains the image placeholder {self.image_placeholder!r}")
            yield self.answer_prefix + answer + self.end_of_turn, True
            if self.turn_suffix:
                yield self.turn_suffix, False

    def _place_image(self, question: str, image_here: bool, where: str) -> str:
        if not image_here:
            if self.image_placeholder in question:
                raise MatvlmError(f"{where}: the question contains the image placeholder "
                                  f"{self.image_placeholder!r} but no image goes there")
            return question
        question = question.replace(self.image_placeholder, "").strip()
        return f"{self.image_placeholder}\n{question}" if question else self.image_placeholder


def _merge(pieces) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for text, is_answer in pieces:
        if out and out[-1][1] == is_answer:
            out[-1] = (out[-1][0] + text, is_answer)
        else:
            out.append((text, is_answer))
    return out


TEMPLATES: dict[str, ChatTemplate] = {
    "phi": ChatTemplate("phi", system=LLAVA_SYSTEM, end_of_turn="<|endoftext|>"),
    "vicuna": ChatTemplate("vicuna", system=LLAVA_SYSTEM, end_of_turn="</s>"),
    "chatml": ChatTemplate("chatml", system=QWEN2_SYSTEM, system_prefix="<|im_start|>system\n",
                           system_suffix="<|im_end|>\n", user_prefix="<|im_start|>user\n",
                           user_suffix="<|im_end|>\n", assistant_cue="<|im_start|>assistant\n",
                           answer_prefix="", end_of_turn="<|im_end|>", turn_suffix="\n"),
    "plain": ChatTemplate("plain", system="", system_suffix="\n", user_suffix="\n",
                          end_of_turn="<|endoftext|>", turn_suffix="\n"),
}

# decoder family (config model_type) -> template name
FAMILY_TEMPLATES = {"phi": "phi", "llama": "vicuna", "mistral": "vicuna", "qwen2": "chatml"}


def get_template(name: str, eos_token: str | None = None) -> ChatTemplate:
    """The template called `name`; for "plain", `eos_token` is its end-of-turn string
    (default "<|endoftext|>", the toy tokenizer's). The others write their fixed end-of-turn."""
    if name not in TEMPLATES:
        raise MatvlmError(f"unknown chat template {name!r}; expected one of {', '.join(TEMPLATES)}")
    template = TEMPLATES[name]
    if name == "plain" and eos_token:
        template = template.with_end_of_turn(eos_token)
    return template


def decoder_family(config) -> str:
    """`model_type` of the decoder: `config.text_config.model_type` for a VLM, else `config.model_type`
    (configs as objects or dicts)."""
    def get(obj, key):
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    text = get(config, "text_config")
    family = get(text, "model_type") if text is not None else None
    return family or get(config, "model_type") or ""


def template_for(config) -> ChatTemplate:
    """The default template of a model: phi -> phi, llama/mistral -> vicuna, qwen2 -> chatml."""
    family = decoder_family(config)
    if family not in FAMILY_TEMPLATES:
        raise MatvlmError(f"no default chat template for decoder family {family!r} (known: "
                          f"{', '.join(FAMILY_TEMPLATES)}); name one of {', '.join(TEMPLATES)} explicitly")
    return TEMPLATES[FAMILY_TEMPLATES[family]]


class TokenizerTemplate:
    """A tokenizer's own (Jinja) chat template as training segments, for text models.

    Inference renders prompts with the tokenizer's template (`matvlm.inputs.prompts.render`), so
    training on chats must write them the same way. The template is only a function from
    messages to text; the answer pieces are found by rendering prefixes: for turn i,
    `P_i = render(messages up to question i, generation prompt)` and
    `F_i = render(messages up to answer i)`; the answer piece is `F_i[len(P_i):]` (the answer and
    the template's end of turn) and the context piece `P_i[len(F_{i-1}):]`. A template for which
    these are not prefixes of each other (one that rewrites earlier turns) is refused.
    """

    name = "tokenizer"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise MatvlmError("the tokenizer has no chat template; name a matvlm template (--template)")
        self.tokenizer = tokenizer
        self.stop_strings = ()

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:       # e.g. a template that takes no system message
            raise MatvlmError(f"the tokenizer's chat template refused the conversation: {e}") from None

    def segments(self, turns: list[tuple[str, str]], has_image: bool,
                 system: str | None = None) -> list[tuple[str, bool]]:
        """As `ChatTemplate.segments` (text only: `has_image` must be False)."""
        if has_image:
            raise MatvlmError("the tokenizer's chat template is used for text-only samples; images need a "
                              "matvlm template (--template)")
        if not turns or any(a is None for _, a in turns):
            raise MatvlmError("training conversations need at least one turn and an answer in every turn")
        messages = [{"role": "system", "content": system}] if system else []
        pieces, done = [], ""
        for i, (question, answer) in enumerate(turns):
            messages.append({"role": "user", "content": question})
            prompt = self._render(messages, True)
            messages.append({"role": "assistant", "content": answer})
            full = self._render(messages, False)
            if not full.startswith(prompt) or len(full) == len(prompt):
                raise MatvlmError(f"turn {i}: with the tokenizer's chat template the prompt ending in the "
                                  "generation cue is not the start of the answered conversation (the template "
                                  "writes answers differently, e.g. drops reasoning), so answer tokens cannot be "
                                  "located; name a matvlm template (--template) or pass plain text")
            if not prompt.startswith(done):
                raise MatvlmError(f"turn {i}: the tokenizer's chat template rewrites earlier turns when the "
                                  "conversation grows, so answer tokens cannot be located; name a matvlm template "
                                  "(--template) or pass plain text")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        return _merge(p for p in pieces if p[0])


def text_template(processor_or_tokenizer, model_config, name: str | None = None):
    """The template of a text model's chats: the one named, else the tokenizer's own chat template
    (what inference renders with), else the decoder family's, else None (plain text only)."""
    tok = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
    if name:
        return get_template(name, eos_token=tok.eos_token)
    if getattr(tok, "chat_template", None):
        return TokenizerTemplate(tok)
    try:
        return template_for(model_config)
    except MatvlmError:
        return None
