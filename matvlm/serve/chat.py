"""`matvlm chat`: streaming terminal chat with a model, images included.

Commands at the prompt: /image PATH (attach an image to the next question), /reset (forget the
conversation), /quit. The image stays attached to the conversation it was given in.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..engine.engine import Engine, Request
from ..engine.prompts import render, stop_strings
from ..engine.sampling import SamplingParams

HELP = "commands: /image PATH, /reset, /quit"


def chat_loop(engine: Engine, params: SamplingParams, image: Path | None = None, template: str | None = None,
              read=input, write=print) -> None:
    """Read questions with `read`, stream answers with `write` (injectable for tests)."""
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
        prompt = render(engine.processor, engine.model.config, messages, len(images), template)
        p = SamplingParams(**{**params.__dict__, "stop": list(params.stop) + stops})
        write("model> ", end="", flush=True)
        answer = ""
        for piece in engine.stream(Request(prompt, list(images), p)):
            answer += piece
            write(piece, end="", flush=True)
        write("")
        messages.append({"role": "assistant", "content": answer.strip()})
