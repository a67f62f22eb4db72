import pytest
from transformers import AutoConfig, LlavaConfig

from matvlm.inputs.templates import TEMPLATES, get_template, template_for
from matvlm.errors import MatvlmError

SYS = ("A chat between a curious user and an artificial intelligence assistant. "
       "The assistant gives helpful, detailed, and polite answers to the user's questions.")
# a 2-turn LLaVA conversation; the image placeholder is at the end of the question, as in some LLaVA data
TURNS = [("What is in the picture?\n<image>", "A red square."), ("What colour is it?", "Red.")]

# Expected strings written out from TinyLLaVA_Factory's phi_template.py / base.py (_prompt, formatter.py),
# LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO) and Qwen2's ChatML chat template.
EXPECTED_TRAIN = {
    "phi": SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.<|endoftext|>"
                 "USER: What colour is it? ASSISTANT: Red.<|endoftext|>",
    "vicuna": SYS + " USER: <image>\nWhat is in the picture? ASSISTANT: A red square.</s>"
                    "USER: What colour is it? ASSISTANT: Red.</s>",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n"
              "<|im_start|>assistant\nA red square.<|im_end|>\n"
              "<|im_start|>user\nWhat colour is it?<|im_end|>\n"
              "<|im_start|>assistant\nRed.<|im_end|>\n",
}
EXPECTED_ANSWERS = {
    "phi": [" A red square.<|endoftext|>", " Red.<|endoftext|>"],
    "vicuna": [" A red square.</s>", " Red.</s>"],
    "chatml": ["A red square.<|im_end|>", "Red.<|im_end|>"],
}
EXPECTED_PROMPT = {  # first question only, answer None
    "phi": SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
    "vicuna": SYS + " USER: <image>\nWhat is in the picture? ASSISTANT:",
    "chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
              "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", ["phi", "vicuna", "chatml"])
def test_training_text_and_answer_pieces(name):
    segs = get_template(name).segments(TURNS, has_image=True)
    assert "".join(t for t, _ in segs) == EXPECTED_TRAIN[name]
    assert [t for t, a in segs if a] == EXPECTED_ANSWERS[name]
    assert all(a != b for (_, a), (_, b) in zip(segs, segs[1:]))  # pieces alternate: merged


@pytest.mark.parametrize("name", ["phi", "vicuna", "chatml"])
def test_inference_prompt(name):
    assert get_template(name).prompt([(TURNS[0][0], None)], has_image=True) == EXPECTED_PROMPT[name]


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_is_the_training_text_before_the_last_answer(name):
    t = get_template(name)
    segs = t.segments(TURNS, has_image=True)
    before_last_answer = "".join(s for s, _ in segs[:max(i for i, (_, a) in enumerate(segs) if a)])
    assert t.prompt([TURNS[0], (TURNS[1][0], None)], has_image=True) == before_last_answer
    assert t.prompt([TURNS[0], (TURNS[1][0], None)], has_image=True).endswith(t.assistant_cue)


def test_plain_training_text_and_prompt():
    # "USER: ...\nASSISTANT: ...<eos>" per turn, the format matvlm.toy.tiny.CHAT_TEMPLATE describes
    t = get_template("plain")
    segs = t.segments([("What?", "A square."), ("And?", "Red.")], has_image=True)
    assert "".join(s for s, _ in segs) == ("USER: <image>\nWhat?\nASSISTANT: A square.<|endoftext|>\n"
                                           "USER: And?\nASSISTANT: Red.<|endoftext|>\n")
    assert [s for s, a in segs if a] == [" A square.<|endoftext|>", " Red.<|endoftext|>"]
    assert t.prompt([("What?", None)], has_image=True) == "USER: <image>\nWhat?\nASSISTANT:"
    assert t.prompt([("What?", None)], has_image=False, system="Be brief.") == "Be brief.\nUSER: What?\nASSISTANT:"


def test_plain_eos_is_a_parameter():
    t = get_template("plain", eos_token="</s>")
    assert t.segments([("q", "a")], False) == [("USER: q\nASSISTANT:", False), (" a</s>", True), ("\n", False)]
    assert t.stop_strings == ("</s>",)
    assert get_template("plain").end_of_turn == "<|endoftext|>"


def test_stop_strings():
    assert get_template("phi").stop_strings == ("<|endoftext|>",)
    assert get_template("vicuna").stop_strings == ("</s>",)
    assert get_template("chatml").stop_strings == ("<|im_end|>",)


@pytest.mark.parametrize("question,expected", [
    ("Describe it.", "<image>\nDescribe it."),          # no placeholder: prepended as LLaVA does
    ("<image>", "<image>"),                            # image-only question
    ("  Describe <image> it. ", "<image>\nDescribe  it."),  # removed, stripped, placed first
])
def test_image_placeholder_goes_first_once(question, expected):
    text = get_template("vicuna").prompt([(question, None)], has_image=True)
    assert text == SYS + f" USER: {expected} ASSISTANT:"


def test_placeholder_without_image_or_outside_the_first_turn_is_rejected():
    t = get_template("phi")
    with pytest.raises(MatvlmError, match="no image goes there"):
        t.segments([("<image>\nWhat?", "x")], has_image=False)
    with pytest.raises(MatvlmError, match="turn 1"):
        t.segments([("What?", "x"), ("<image> again", "y")], has_image=True)
    with pytest.raises(MatvlmError, match="answer contains"):
        t.segments([("What?", "an <image>")], has_image=True)


def test_system_override_and_no_system():
    t = get_template("chatml")
    assert t.prompt([("hi", None)], False, system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert t.prompt([("hi", None)], False, system="") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_turn_shape_errors():
    t = get_template("phi")
    with pytest.raises(MatvlmError, match="at least one"):
        t.segments([], False)
    with pytest.raises(MatvlmError, match="answer in every turn"):
        t.segments([("q", None)], False)
    with pytest.raises(MatvlmError, match="ending with"):
        t.prompt([("q", "a")], False)
    with pytest.raises(MatvlmError, match="only the last"):
        t.prompt([("q", None), ("q2", None)], False)


def test_get_template_lists_valid_names():
    with pytest.raises(MatvlmError, match="unknown chat template 'llama3'.*phi, vicuna, chatml, plain"):
        get_template("llama3")


def _llava(family):
    text = AutoConfig.for_model(family, vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64)
    return LlavaConfig(text_config=text)


@pytest.mark.parametrize("family,name", [("phi", "phi"), ("llama", "vicuna"), ("mistral", "vicuna"),
                                         ("qwen2", "chatml")])
def test_template_for_decoder_family(family, name):
    assert template_for(_llava(family)).name == name                                  # VLM: its text_config
    assert template_for(AutoConfig.for_model(family)).name == name                     # causal LM
    assert template_for({"model_type": "tinyllava", "text_config": {"model_type": family}}).name == name


def test_template_for_unknown_family():
    with pytest.raises(MatvlmError, match="no default chat template for decoder family 'gpt2'"):
        template_for(AutoConfig.for_model("gpt2"))


def test_toy_tokenizer_chat_template_renders_the_plain_template():
    from matvlm.toy.tiny import byte_tokenizer

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And?"}]
    rendered = byte_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == get_template("plain").prompt([("What is it?", "A cat."), ("And?", None)], has_image=True)
