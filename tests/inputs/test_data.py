import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from matvlm.errors import MatvlmError
from matvlm.inputs.data import LlavaJsonDataset, TextJsonlDataset, collate
from matvlm.inputs.images import expand2square, image_token_count, load_image
from matvlm.inputs.templates import get_template
from matvlm.inputs.tokens import IGNORE_INDEX, encode_segments, truncate
from matvlm.toy.tiny import tiny_llava

N_IMG = 15  # (32 // 8) ** 2 - 1 with the "default" (CLS-dropping) strategy
Q1, A1, Q2, A2 = "What is in the picture?", "A red square.", "What colour is it?", "Red."


@pytest.fixture(scope="module")
def processor():
    return tiny_llava("phi", n_layer=1, hidden=32, heads=2, vision_layers=1)[1]


@pytest.fixture
def files(tmp_path):
    """A LLaVA JSON with a 2-turn image sample, a text-only sample and its image (40 x 52, RGB)."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, size=(40, 52, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    entries = [
        {"id": "img-1", "image": "a.png", "conversations": [
            {"from": "human", "value": f"{Q1}\n<image>"}, {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
        {"id": "txt-1", "conversations": [{"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]},
    ]
    return tmp_path, entries


def write(path, entries, jsonl=False):
    path.write_text("\n".join(json.dumps(e) for e in entries) if jsonl else json.dumps(entries))
    return path


def answer_spans(tok, labels):
    """Decoded runs of consecutive label tokens."""
    runs, cur = [], []
    for t in labels.tolist() + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def test_image_token_count(processor):
    assert image_token_count(processor) == N_IMG
    crop = SimpleNamespace(do_center_crop=True, crop_size={"height": 336, "width": 336}, size={"shortest_edge": 336})
    clip_like = SimpleNamespace(image_processor=crop, patch_size=14, num_additional_image_tokens=1,
                                vision_feature_select_strategy="full")
    assert image_token_count(clip_like) == 24 * 24 + 1                 # llava-1.5 layout with CLS kept
    clip_like.vision_feature_select_strategy = "default"
    assert image_token_count(clip_like) == 24 * 24                      # CLS dropped
    no_crop = SimpleNamespace(image_processor=SimpleNamespace(do_center_crop=False, size={"shortest_edge": 336}),
                              patch_size=14)
    with pytest.raises(MatvlmError, match="fixed height and width"):
        image_token_count(no_crop)


def test_image_token_count_after_save_and_reload(processor, tmp_path):
    from transformers import AutoProcessor

    processor.save_pretrained(tmp_path)
    assert image_token_count(AutoProcessor.from_pretrained(tmp_path)) == N_IMG


def test_ids_and_pixels_match_the_processor(processor, files):
    root, entries = files
    ds = LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("phi"), max_length=512)
    item = ds[0]
    text = "".join(s for s, _ in get_template("phi").segments([(f"{Q1}\n<image>", A1), (Q2, A2)], True))
    img = Image.open(root / "a.png").convert("RGB")
    ref = processor(text=text, images=img, return_tensors="pt")
    assert item["id"] == "img-1"
    assert torch.equal(item["input_ids"], ref["input_ids"][0])
    assert torch.equal(item["pixel_values"], ref["pixel_values"][0]) and item["pixel_values"].shape == (3, 32, 32)
    assert (item["input_ids"] == processor.image_token_id).sum() == N_IMG
    assert (item["labels"][item["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()


def test_labels_cover_exactly_the_answers(processor, files):
    root, entries = files
    ds = LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("phi"), max_length=512)
    item = ds[0]
    assert answer_spans(processor.tokenizer, item["labels"]) == [f" {A1}<|endoftext|>", f" {A2}<|endoftext|>"]
    on = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][on], item["input_ids"][on])
    ds_v = LlavaJsonDataset(root / "d.json", root, processor, get_template("vicuna"), max_length=512)
    assert answer_spans(processor.tokenizer, ds_v[0]["labels"]) == [f" {A1}</s>", f" {A2}</s>"]


def test_text_only_sample(processor, files):
    root, entries = files
    ds = LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("chatml"), max_length=512)
    item = ds[1]
    text = get_template("chatml").segments([(Q2, A2)], False)
    ref = processor.tokenizer("".join(s for s, _ in text), return_tensors="pt")["input_ids"][0]
    assert item["id"] == "txt-1" and item["pixel_values"] is None
    assert torch.equal(item["input_ids"], ref)
    assert answer_spans(processor.tokenizer, item["labels"]) == [f"{A2}<|im_end|>"]


def test_jsonl_and_determinism(processor, files):
    root, entries = files
    a = LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("phi"), 512)
    b = LlavaJsonDataset(write(root / "d.jsonl", entries, jsonl=True), None, processor, get_template("phi"), 512)
    assert len(a) == len(b) == 2
    for x, y in [(a[0], b[0]), (a[1], b[1]), (a[0], a[0])]:
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])


def test_piece_by_piece_tokenising_agrees(processor):
    segs = get_template("phi").segments([("<image>\nq", "a b"), ("c", "d")], True)
    ids, labels = encode_segments(segs, processor, N_IMG)
    ids2, labels2 = encode_segments(segs, processor, N_IMG, by_segment=True)
    assert torch.equal(ids, ids2) and torch.equal(labels, labels2)


def test_sentencepiece_style_tokenizer_with_bos():
    """Metaspace BPE + BOS (Llama-like): cutting text into pieces would change ids, whole-text offsets do not."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    raw.train_from_iterator([f"USER: {Q1} ASSISTANT: {A1} {A2} {Q2}"] * 20,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<image>"]))
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    segs = get_template("vicuna").segments([(f"<image>\n{Q1}", A1), (Q2, A2)], True, system="")
    ids, labels = encode_segments(segs, tok, 3)
    assert ids.tolist() == tok("".join(s for s, _ in segs).replace("<image>", "<image>" * 3))["input_ids"]
    assert ids[0] == tok.bos_token_id and labels[0] == IGNORE_INDEX
    assert tok.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist()) == \
        ["\u2581A", "\u2581red", "\u2581square.", "</s>", "\u2581Red.", "</s>"]


def test_piece_by_piece_adds_the_tokenizers_special_tokens():
    class Chars:  # a tokenizer without offsets that wraps texts in BOS=1 ... EOS=2
        is_fast = False

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def build_inputs_with_special_tokens(self, ids):
            return [1] + ids + [2]

    ids, labels = encode_segments([("q:", False), (" a", True)], Chars())
    assert ids.tolist() == [1, ord("q"), ord(":"), ord(" "), ord("a"), 2]
    assert labels.tolist() == [-100, -100, -100, ord(" "), ord("a"), -100]


def test_missing_image_skipped_or_strict(processor, files):
    root, entries = files
    entries.append({"id": "gone", "image": "missing.png", "conversations": entries[1]["conversations"]})
    path = write(root / "d.json", entries)
    ds = LlavaJsonDataset(path, root, processor, get_template("phi"), 512)
    assert len(ds) == 2 and ds.skipped_missing_images == 1
    assert [ds[i]["id"] for i in range(len(ds))] == ["img-1", "txt-1"]
    with pytest.raises(MatvlmError, match=r"'gone'.*missing\.png does not exist"):
        LlavaJsonDataset(path, root, processor, get_template("phi"), 512, strict=True)


@pytest.mark.parametrize("entry,why", [
    ({"id": "bad-7", "image": "a.png"}, "missing 'conversations'"),
    ({"id": "bad-7", "conversations": []}, "'conversations' is empty"),
    ({"id": "bad-7", "conversations": "hi"}, "'conversations' is str; expected a list"),
    ({"id": "bad-7", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "message 0 is from the assistant, expected the user"),
    ({"id": "bad-7", "conversations": [{"from": "human", "value": ["q"]}, {"from": "gpt", "value": "a"}]},
     "'value' is list, expected a string"),
    ({"id": "bad-7", "conversations": [{"from": "robot", "value": "q"}]}, "role 'robot'"),
    ({"id": "bad-7", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]},
     "message 1 \\(assistant\\) is empty"),
    ({"id": "bad-7", "conversations": [{"from": "human", "value": "q"}]}, "ends with a user message"),
    ({"id": "bad-7", "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]},
     "contains '<image>' but the sample has no image"),
    ({"id": "bad-7", "image": "a.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "b"}]},
     "message 2 contains '<image>' but only the first user message may hold it"),
    ({"id": "bad-7", "image": ["a.png", "b.png"], "conversations": []}, "expected one image path"),
])
def test_malformed_entry_names_its_id(processor, files, entry, why):
    root, entries = files
    path = write(root / "d.json", entries + [entry])
    with pytest.raises(MatvlmError, match=r"entry 'bad-7' \(index 2\): .*" + why) as e:
        LlavaJsonDataset(path, root, processor, get_template("phi"), 512)
    assert "\n" not in str(e.value)


def test_image_sample_needs_a_processor(processor, files):
    root, entries = files
    with pytest.raises(MatvlmError, match="'img-1'.*has an image but a tokenizer, not a LlavaProcessor"):
        LlavaJsonDataset(write(root / "d.json", entries), root, processor.tokenizer, get_template("phi"), 512)
    ds = LlavaJsonDataset(write(root / "t.json", entries[1:]), root, processor.tokenizer, get_template("phi"), 512)
    assert ds[0]["id"] == "txt-1"                                                 # text-only data needs no processor


def test_malformed_entry_without_id_names_its_index(processor, tmp_path):
    path = write(tmp_path / "d.json", [{"conversations": [{"from": "human"}]}])
    with pytest.raises(MatvlmError, match="entry at index 0: message 0 'value' is NoneType"):
        LlavaJsonDataset(path, tmp_path, processor, get_template("phi"), 512)


def test_truncation_never_cuts_the_image(processor, files):
    root, entries = files
    path = write(root / "d.json", entries[:1])
    full = LlavaJsonDataset(path, root, processor, get_template("chatml"), 512)[0]
    image_end = int((full["input_ids"] == processor.image_token_id).nonzero().max()) + 1
    ds = LlavaJsonDataset(path, root, processor, get_template("chatml"), max_length=image_end - 1)
    assert len(ds) == 0 and ds.skipped_too_long == 1
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    kept = LlavaJsonDataset(path, root, processor, get_template("chatml"), max_length=first_label + 2)[0]
    assert (kept["input_ids"] == processor.image_token_id).sum() == N_IMG
    assert answer_spans(processor.tokenizer, kept["labels"]) == [A1[:2]]


def test_truncate_drops_a_cut_image_even_with_labels_left():
    ids, labels = torch.tensor([6, 9, 9, 7]), torch.tensor([6, -100, -100, 7])
    assert truncate(ids, labels, 2, image_id=9) is None                     # a label survives, half the image not
    assert [t.tolist() for t in truncate(ids, labels, 3, image_id=9)] == [[6, 9, 9], [6, -100, -100]]
    assert truncate(ids, labels, 2) is not None                             # text-only: no image to protect
    assert truncate(ids, labels, 4, image_id=9)[0] is ids


def test_truncation_in_an_answer_keeps_a_shorter_label_span(processor, files):
    root, entries = files
    path = write(root / "d.json", entries[:1])
    full = LlavaJsonDataset(path, root, processor, get_template("phi"), 512)[0]
    cut = len(full["input_ids"]) - 4          # inside " Red.<|endoftext|>": keeps " R"
    item = LlavaJsonDataset(path, root, processor, get_template("phi"), max_length=cut)[0]
    assert len(item["input_ids"]) == len(item["labels"]) == cut
    assert torch.equal(item["input_ids"], full["input_ids"][:cut])
    assert answer_spans(processor.tokenizer, item["labels"]) == [f" {A1}<|endoftext|>", " R"]


def test_truncation_that_leaves_no_answer_drops(processor, files):
    root, entries = files
    path = write(root / "d.json", entries[1:])
    full = LlavaJsonDataset(path, root, processor, get_template("phi"), 512)[0]
    first_label = int((full["labels"] != IGNORE_INDEX).nonzero().min())
    ds = LlavaJsonDataset(path, root, processor, get_template("phi"), max_length=first_label)
    assert len(ds) == 0 and ds.skipped_too_long == 1


def test_expand2square_pads_with_the_colour_and_centres():
    wide = Image.new("RGB", (5, 2), (255, 0, 0))
    out = np.asarray(expand2square(wide, (10, 20, 30)))
    assert out.shape == (5, 5, 3)
    assert (out[1:3] == (255, 0, 0)).all()                                   # rows 1, 2: (5 - 2) // 2 = 1
    assert (out[[0, 3, 4]] == (10, 20, 30)).all()
    tall = np.asarray(expand2square(Image.new("RGB", (2, 4), (0, 255, 0)), (1, 2, 3)))
    assert (tall[:, 1:3] == (0, 255, 0)).all() and (tall[:, [0, 3]] == (1, 2, 3)).all()
    square = Image.new("RGB", (3, 3))
    assert expand2square(square, (0, 0, 0)) is square


def test_load_image_pad_uses_the_mean_colour(processor, tmp_path):
    Image.new("RGB", (64, 16), (255, 255, 255)).save(tmp_path / "w.png")
    pad = load_image(tmp_path / "w.png", processor, "pad")                   # (3, 32, 32)
    assert pad.shape == (3, 32, 32) and pad.dtype == torch.float32
    mean_colour = (127 / 255 - 0.5) / 0.5                                    # int(0.5 * 255), normalised
    assert torch.allclose(pad[:, 0, 0], torch.full((3,), mean_colour), atol=1e-6)   # padded band at the top
    assert torch.allclose(pad[:, 16, 16], torch.ones(3), atol=1e-6)          # the white image in the middle
    square = load_image(tmp_path / "w.png", processor, "square")
    assert torch.allclose(square[:, 0, 0], torch.ones(3), atol=1e-6)         # stretched, no padding
    with pytest.raises(MatvlmError, match="pad, square|square, pad"):
        load_image(tmp_path / "w.png", processor, "crop")


def test_collate_pads_right_and_stacks_images(processor, files):
    root, entries = files
    ds = LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("phi"), 512)
    long, short = ds[0], ds[1]
    batch = collate([short, long], pad_token_id=ds.pad_token_id)
    B, T, n = 2, len(long["input_ids"]), len(short["input_ids"])
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["labels"].shape == (B, T)
    assert torch.equal(batch["input_ids"][0, :n], short["input_ids"])
    assert (batch["input_ids"][0, n:] == processor.tokenizer.pad_token_id).all()
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (T - n) and batch["attention_mask"][1].all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and torch.equal(batch["labels"][1], long["labels"])
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and torch.equal(batch["pixel_values"][0], long["pixel_values"])
    assert batch["ids"] == ["txt-1", "img-1"]
    assert collate([short], 0)["pixel_values"] is None


def test_text_jsonl_plain_and_chat(processor, tmp_path):
    tok = processor.tokenizer
    lines = [{"text": "hello world"},
             {"id": "c1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "yo"}, {"role": "user", "content": "and?"},
                                       {"role": "assistant", "content": "done"}]}]
    ds = TextJsonlDataset(write(tmp_path / "t.jsonl", lines, jsonl=True), processor, get_template("plain"), 64)
    plain, chat = ds[0], ds[1]
    assert plain["id"] == "0" and plain["pixel_values"] is None
    assert plain["input_ids"].tolist() == tok("hello world")["input_ids"] + [tok.eos_token_id]
    assert torch.equal(plain["labels"], plain["input_ids"])                  # every token is a label
    assert tok.decode(chat["input_ids"]) == ("Be brief.\nUSER: hi\nASSISTANT: yo<|endoftext|>\n"
                                             "USER: and?\nASSISTANT: done<|endoftext|>\n")
    assert answer_spans(tok, chat["labels"]) == [" yo<|endoftext|>", " done<|endoftext|>"]
    short = TextJsonlDataset(tmp_path / "t.jsonl", tok, get_template("plain"), 5)
    assert short[0]["input_ids"].tolist() == tok("hello")["input_ids"]      # plain text is cut, not dropped
    assert len(short) == 1 and short.skipped_too_long == 1                   # the chat's answers are all cut


@pytest.mark.parametrize("line,why", [
    ({"id": "t9", "text": ""}, "'text' must be a non-empty string"),
    ({"id": "t9", "text": "a", "messages": []}, "either 'text' or 'messages'"),
    ({"id": "t9", "messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}]},
     "a system message may only come first"),
    ({"id": "t9", "messages": [{"role": "assistant", "content": "a"}]}, "message 0 is from the assistant"),
    ({"id": "t9", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
     "'content' is int"),
])
def test_text_jsonl_malformed(processor, tmp_path, line, why):
    path = write(tmp_path / "t.jsonl", [{"text": "ok"}, line], jsonl=True)
    with pytest.raises(MatvlmError, match=r"entry 't9' \(index 1\): .*" + why):
        TextJsonlDataset(path, processor, get_template("plain"), 64)


def test_text_jsonl_chat_needs_a_template(processor, tmp_path):
    path = write(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "assistant", "content": "a"}]}], jsonl=True)
    with pytest.raises(MatvlmError, match="no chat template was given"):
        TextJsonlDataset(path, processor, None, 64)


def test_items_are_the_up_front_encoding_and_training_never_tokenizes_again(processor, files, tmp_path, monkeypatch):
    root, entries = files
    lines = [{"text": "hello world"}, {"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}]
    sets = [LlavaJsonDataset(write(root / "d.json", entries), root, processor, get_template("phi"), 512),
            TextJsonlDataset(write(tmp_path / "t.jsonl", lines, jsonl=True), processor, get_template("plain"), 64)]
    for ds in sets:
        fresh = [ds._encode(s) for s in ds.samples]                  # what encoding the samples gives now
        monkeypatch.setattr(ds, "_encode", lambda *a: pytest.fail("tokenized while training"))
        for i, (ids, labels) in enumerate(fresh):
            item = ds[i]
            assert item["input_ids"].dtype == torch.long and torch.equal(item["input_ids"], ids)
            assert torch.equal(item["labels"], labels)
        assert (ds[len(ds) - 1]["labels"] == IGNORE_INDEX).any()           # a chat: its prompt is no label
