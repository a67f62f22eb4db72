"""`matvlm chat`: streaming terminal chat with a model, images included.

Commands at the prompt: /image PATH (attach an image to the next question), /reset (forget the
conversation), /quit. The image stays attached to the conversation it was given in.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..engine.engine import Engine, Request, context_limit
from ..inputs.prompts import render, stop_strings
from ..engine.sampling import SamplingParams
from ..errors import MatvlmError

HELP = "commands: /image PATH, /reset, /quit"


def answer_length(engine: Engine, prompt_tokens: int, wanted: int) -> int:
    """Tokens an answer may take: `wanted`, or what is left of the model's context if that is less
    (0: the conversation already fills it)."""
    limit = context_limit(engine.model)
    return wanted if limit is None else max(0, min(wanted, limit - prompt_tokens))


def chat_loop(engine: Engine, params: SamplingParams, image: Path | None = None, template: str | None = None,
              read=input, write=print, note_shortened: bool = True) -> None:
    """Read questions with `read`, stream answers with `write` (injectable for tests).

    Each answer may take `params.max_new_tokens` tokens or what is left of the model's context, whichever
    is less (with a note if `note_shortened`); a turn that leaves no room, or that fails (an image the model
    cannot take, ...), gets a one-line message and is dropped from the conversation, and the chat goes on."""
    messages: list[dict] = []
    images: list[Image.Image] = []
    stops = stop_strings(engine.processor, engine.model.config, template)

    def attach(path: str) -> None:
        if not engine.vlm:
            write("this model takes no images")
            return
        try:
            images.append(Image.open(Path(path).expanduser()).convert("RGB"))
            write(f"[image attached: {path}]")
        except (OSError, UnidentifiedImageError) as e:
            write(f"cannot read image {path}: {e}")

    if image is not None:
        attach(str(image))
    write(HELP)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, images = [], []
            write("[conversation reset]")
            continue
        if line.startswith("/image"):
            attach(line[len("/image"):].strip())
            continue
        messages.append({"role": "user", "content": line})
        answer = _turn(engine, params, messages, images, template, stops, write, note_shortened)
        if answer is None:
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": answer.strip()})


def _turn(engine: Engine, params: SamplingParams, messages: list[dict], images: list, template: str | None,
          stops: list[str], write, note_shortened: bool) -> str | None:
    """Stream one answer; None (after a one-line message) when the turn cannot be answered."""
    try:
        prompt = render(engine.processor, engine.model.config, messages, len(images), template)
        request = Request(prompt, list(images), SamplingParams(**{**params.__dict__, "stop": list(params.stop) + stops}))
        n_prompt = len(engine.encode(request)[0])
        room = answer_length(engine, n_prompt, params.max_new_tokens)
        if room < 1:
            write(f"[this turn does not fit: the conversation is {n_prompt} tokens and the model's context "
                  f"{context_limit(engine.model)}; /reset starts a new one]")
            return None
        if room < params.max_new_tokens and note_shortened:
            write(f"[answer limited to {room} tokens, what is left of the model's context]")
        request.params.max_new_tokens = room
        write("model> ", end="", flush=True)
        answer = ""
        for piece in engine.stream(request):
            answer += piece
            write(piece, end="", flush=True)
        write("")
        return answer
    except MatvlmError as e:
        write(f"[cannot answer: {e}]")
        return None
