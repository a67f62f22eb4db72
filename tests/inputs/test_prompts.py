"""Prompt rendering: every piece of the user's text reaches the model, whatever form the chat template reads."""

import pytest

import matvlm
from matvlm.inputs.prompts import render, takes_parts

# A llava-hf-style template: it iterates each message's content parts (strings would render as nothing).
PARTS = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
         "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
         "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
# A text-model template that reads strings (as SmolLM2's does).
STRINGS = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")

CONVERSATION = [{"role": "system", "content": "Be brief, sailor."},
                {"role": "user", "content": "Which colour is the kite?"},
                {"role": "assistant", "content": "It is orange."},
                {"role": "user", "content": "And how many birds fly beside it?"}]


@pytest.fixture
def processor(teacher_dirs):
    return matvlm.load_processor(teacher_dirs["llama"])


@pytest.mark.parametrize("kind", ["parts", "strings"])
@pytest.mark.parametrize("n_images", [0, 1])
def test_every_piece_of_text_is_in_the_prompt(processor, teacher_dirs, kind, n_images):
    processor.chat_template = PARTS if kind == "parts" else STRINGS
    processor.tokenizer.chat_template = processor.chat_template
    cfg = matvlm.load(teacher_dirs["llama"]).config
    assert takes_parts(processor) == (kind == "parts")
    prompt = render(processor, cfg, CONVERSATION, n_images)
    for m in CONVERSATION:
        assert m["content"] in prompt, (kind, prompt)
    assert prompt.count("<image>") == n_images
    if n_images:
        assert prompt.index("<image>") < prompt.index("Which colour")            # on the first user turn
    one = render(processor, cfg, [{"role": "user", "content": "Only a question?"}])
    assert "Only a question?" in one


def test_the_server_answers_over_context_prompts_with_400_under_a_parts_template(teacher_dirs):
    """A 100 000-word question to a small-context model: refused with context_length_exceeded, not answered."""
    from fastapi.testclient import TestClient

    from matvlm.engine.engine import Engine
    from matvlm.serve.openai_api import create_app
    from matvlm.serve.service import BatchingService

    d = teacher_dirs["llama"]
    proc = matvlm.load_processor(d)
    proc.chat_template = proc.tokenizer.chat_template = PARTS
    engine = Engine(matvlm.load(d), proc, device="cpu")
    client = TestClient(create_app(BatchingService(engine), "tiny"))
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 100000}],
                                                  "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello there"}],
                                                  "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > len("USER: \nASSISTANT:") // 4
