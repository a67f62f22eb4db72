"""OpenAI conventions with the official client, on a converted tiny llava-hf model whose chat template
iterates content parts: usage counts (plain and streamed), and 400s naming unsupported parameters."""


import openai
import pytest

import matvlm
from matvlm.convert import convert
from matvlm.engine.engine import Engine, Request
from matvlm.inputs.prompts import render
from tests.inputs.test_prompts import PARTS


@pytest.fixture(scope="module", params=["static", "continuous"])
def served(request, teacher_dirs, tmp_path_factory):
    from matvlm.serve.openai_api import create_app, serving
    from matvlm.serve.service import BatchingService, ContinuousService

    path = convert(teacher_dirs["llama"], tmp_path_factory.mktemp("conv") / "h", mamba_ratio=0.5)
    proc = matvlm.load_processor(path)
    proc.chat_template = proc.tokenizer.chat_template = PARTS
    engine = Engine(matvlm.load(path), proc, device="cpu")
    service = (BatchingService if request.param == "static" else ContinuousService)(engine, max_batch=4)
    with serving(create_app(service, "tiny")) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0), engine


QUESTION = [{"role": "user", "content": [{"type": "text", "text": "Which colour is the kite in the sky?"}]}]


def test_usage_counts_the_prompt_and_answer_tokens_plain_and_streamed(served):
    client, engine = served
    want_prompt = len(engine.encode(Request(render(engine.processor, engine.model.config,
                                                   [{"role": "user", "content": QUESTION[0]["content"][0]["text"]}])))[0])
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (want_prompt, 5, want_prompt + 5)

    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    *content, last = chunks
    assert last.choices == [] and last.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                                 "total_tokens"}) == \
        {"prompt_tokens": want_prompt, "completion_tokens": 5, "total_tokens": want_prompt + 5}
    assert all(c.usage is None for c in content)
    assert "".join(c.choices[0].delta.content or "" for c in content) == r.choices[0].message.content
    plain = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, stream=True))
    assert all(c.choices for c in plain)                    # no usage chunk unless asked for


UNSUPPORTED = {
    "n": {"n": 2}, "logprobs": {"logprobs": True}, "top_logprobs": {"logprobs": False, "top_logprobs": 3},
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]},
    "tool_choice": {"tool_choice": "required"}, "response_format": {"response_format": {"type": "json_object"}},
    "functions": {"functions": [{"name": "f", "parameters": {"type": "object"}}]},
    "frequency_penalty": {"frequency_penalty": 0.5}, "logit_bias": {"logit_bias": {"5": 10}},
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_parameters_get_a_400_that_names_them(served, name):
    client, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, **UNSUPPORTED[name])
    err = e.value.body
    assert name in err["message"] and err["param"] == name and err["code"] == "unsupported_parameter", err


def test_parameters_at_their_neutral_values_are_accepted(served):
    client, _ = served
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, n=1, logprobs=False,
                                       response_format={"type": "text"}, presence_penalty=0, user="me")
    assert len(r.choices) == 1
