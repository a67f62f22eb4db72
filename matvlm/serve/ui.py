"""`matvlm ui`: a Gradio chat with image upload, streaming, and sampling controls that take effect."""

from __future__ import annotations

from ..engine.engine import Request
from ..inputs.prompts import render, stop_strings
from ..engine.sampling import SamplingParams
from .service import Service


def build_app(service: Service, title: str = "matvlm", template: str | None = None):
    import gradio as gr

    engine = service.engine
    stops = stop_strings(engine.processor, engine.model.config, template)

    def respond(message, history, image, temperature, top_p, max_tokens, seed):
        """Stream the answer to `message` given the chat `history` ([{"role", "content"}]) and an image."""
        messages = [{"role": m["role"], "content": m["content"]} for m in (history or [])
                    if isinstance(m.get("content"), str)]
        messages.append({"role": "user", "content": message})
        images = [image.convert("RGB")] if image is not None and engine.vlm else []
        params = SamplingParams(max_new_tokens=int(max_tokens), temperature=float(temperature), top_p=float(top_p),
                                seed=int(seed) if seed is not None and int(seed) >= 0 else None, stop=stops)
        prompt = render(engine.processor, engine.model.config, messages, len(images), template)
        text = ""
        for piece in service.submit(Request(prompt, images, params)).stream():
            text += piece
            yield text

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"### {title}")
        with gr.Row():
            image = gr.Image(type="pil", label="image", visible=engine.vlm)
            with gr.Column(scale=2):
                gr.ChatInterface(
                    respond,
                    additional_inputs=[image,
                                       gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)"),
                                       gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top-p"),
                                       gr.Slider(1, 1024, value=256, step=1, label="max new tokens"),
                                       gr.Number(value=-1, precision=0, label="seed (-1 = random)")],
                    api_name="chat")
    return app
