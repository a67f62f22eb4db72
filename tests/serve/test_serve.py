"""Adapters over the engine: OpenAI-compatible server, Gradio app, terminal chat (with the shipped toy teacher)."""

import base64
import io
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import matvlm
from matvlm.engine.engine import Engine
from matvlm.serve.service import BatchingService
from matvlm.toy import shapes
from matvlm.toy.demo import ASSET


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    engine = Engine(matvlm.load(ASSET, dtype="float32"), matvlm.load_processor(ASSET), device="cpu")
    return BatchingService(engine, max_batch=16)


@pytest.fixture(scope="module")
def scene_png():
    scene = shapes.Scene(shapes=(shapes.Shape("circle", "red", "large", 0, 0),), grid=3)
    buf = io.BytesIO()
    shapes.render(scene).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(service):
    from matvlm.serve.openai_api import Limits, create_app, serving

    app = create_app(service, "toy", api_key="secret", limits=Limits(max_image_pixels=128 * 128))
    with serving(app) as base:
        yield base


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def image_message(png, text="What color is the circle?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}},
                                         {"type": "text", "text": text}]}]


def test_openai_client_plain_and_streaming_with_an_image(server, scene_png):
    client = openai.OpenAI(base_url=server + "/v1", api_key="secret")
    assert [m.id for m in client.models.list()] == ["toy"]
    r = client.chat.completions.create(model="toy", messages=image_message(scene_png), temperature=0, max_tokens=8)
    assert r.choices[0].message.content.strip() == "red" and r.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="toy", messages=image_message(scene_png, "Describe the image."), temperature=0, max_tokens=40,
        stream=True)]
    assert "".join(pieces).strip() == "A large red circle at the top left."
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong").models.list()


BAD = {
    "bad-json": (b"{not json", 400, "not valid JSON"),
    "bad-base64": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}]}]}, 400, "not valid base64"),
    "not-an-image": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}]}]}, 400, "readable image"),
    "remote-url": ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.com/a.png"}}]}]}, 400, "remote URLs are not fetched"),
    "too-long": ({"messages": [{"role": "user", "content": "red " * 600}]}, 400, "exceeds the model's context"),
    "unknown-model": ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    "no-messages": ({"messages": []}, 400, "non-empty list"),
    "bad-temperature": ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_requests_get_4xx_json_and_the_server_keeps_serving(server, scene_png, case):
    body, status, text = BAD[case]
    headers = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
    r = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=60,
                   **({"content": body} if isinstance(body, bytes) else {"json": body}))
    assert r.status_code == status and text in r.json()["error"]["message"], r.text
    ok = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=60,
                    json={"messages": image_message(scene_png), "temperature": 0, "max_tokens": 4})
    assert ok.status_code == 200


def test_non_json_bodies_unknown_paths_and_methods_get_openai_errors(server):
    auth = {"Authorization": "Bearer secret"}
    body = '{"messages": [{"role": "user", "content": "hi"}]}'
    r = httpx.post(server + "/v1/chat/completions", headers={**auth, "Content-Type": "text/plain"}, content=body,
                   timeout=60)
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], r.text
    ok = httpx.post(server + "/v1/chat/completions", content=body, timeout=60,
                    headers={**auth, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text
    r = httpx.post(server + "/v1/completions", headers=auth, json={"prompt": "hi"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "detail" not in r.json()
    assert "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.get(server + "/v1/chat/completions", headers=auth, timeout=60)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_oversized_image_is_refused(server):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200), "white").save(buf, format="PNG")
    r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": "Bearer secret"}, timeout=60,
                   json={"messages": image_message(buf.getvalue())})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]


def test_sixteen_concurrent_clients_all_get_answers(server, scene_png, service):
    batches = []
    real = service.engine._run

    def spy(reqs, **kw):
        batches.append(len(reqs))
        return real(reqs, **kw)

    service.engine._run = spy
    try:
        def ask(i):
            r = httpx.post(server + "/v1/chat/completions", headers={"Authorization": "Bearer secret"}, timeout=120,
                           json={"messages": image_message(scene_png), "temperature": 0, "max_tokens": 4})
            return r.status_code, r.json()["choices"][0]["message"]["content"].strip()

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(ask, range(16)))
    finally:
        service.engine._run = real
    assert results == [(200, "red")] * 16
    assert max(batches) > 1, f"requests were not batched: {batches}"


def test_gradio_app_streams_and_its_controls_take_effect(service, scene_png, tmp_path):
    import gradio_client

    from matvlm.serve.ui import build_app

    port = free_port()
    app = build_app(service, title="toy")
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        img = tmp_path / "scene.png"
        img.write_bytes(scene_png)
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        image = gradio_client.handle_file(str(img))
        full = client.predict("Describe the image.", image, 0.0, 1.0, 64, -1, api_name="/chat")
        short = client.predict("Describe the image.", image, 0.0, 1.0, 2, -1, api_name="/chat")
        assert full.strip() == "A large red circle at the top left."
        assert len(short) < len(full)                                      # max tokens takes effect
        hot = {client.predict("Describe the image.", image, 2.0, 1.0, 12, s, api_name="/chat") for s in range(4)}
        assert len(hot) > 1                                                 # temperature takes effect
    finally:
        app.close()


def test_terminal_chat_multi_turn_with_image_and_reset(service, scene_png, tmp_path):
    from matvlm.engine.sampling import SamplingParams
    from matvlm.serve.chat import chat_loop

    img = tmp_path / "scene.png"
    img.write_bytes(scene_png)
    lines = iter([f"/image {img}", "What color is the circle?", "/reset", "/quit"])
    out = []
    chat_loop(service.engine, SamplingParams(max_new_tokens=8), read=lambda prompt: next(lines),
              write=lambda *a, **k: out.append(" ".join(map(str, a))))
    text = "".join(out)
    assert "[image attached" in text and "red" in text and "[conversation reset]" in text


def test_terminal_chat_fits_answers_to_the_context_and_goes_on_after_a_turn_that_cannot_fit(service):
    """The toy model's context is 512 tokens: the default answer length (512) is shortened to what is left,
    a question longer than the context gets a one-line message, and the next question is answered."""
    from matvlm.engine.sampling import SamplingParams
    from matvlm.serve.chat import chat_loop

    long = " ".join(["the"] * 600)
    lines = iter(["How many shapes are there?", long, "What color is the circle?", "/quit"])
    out = []
    chat_loop(service.engine, SamplingParams(max_new_tokens=512), read=lambda prompt: next(lines),
              write=lambda *a, **k: out.append(" ".join(map(str, a))), note_shortened=True)
    text = "\n".join(out)
    assert text.count("[answer limited to") == 2, text
    assert text.count("[this turn does not fit") == 1, text
    assert text.count("model>") == 2, text            # both fitting questions answered, the long one not
    after = text.split("[this turn does not fit")[1]
    assert "model>" in after                          # the chat went on after the refused turn
