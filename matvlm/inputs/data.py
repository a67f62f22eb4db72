"""Training and scoring data: LLaVA / ShareGPT4V conversations and text-only JSONL as token ids,
answer-only labels and pixel values, plus the batch collator (distillation, placement, eval-lm).

A sample is templated (`templates.ChatTemplate.segments`), tokenised, and its single image
placeholder expanded to `image_token_count(processor)` image tokens, so `input_ids` are exactly what
`LlavaProcessor(text=templated_text, images=image)` produces. `labels` equal `input_ids` on the
answers and the end-of-turn marker after each, -100 elsewhere (transformers shifts them itself).

Tokenisation is `tokens.encode_segments`; images are `images.load_image`.

Nothing here is random: the same file gives the same samples in the same order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MatvlmError
from .images import ASPECTS, image_token_count, load_image
from .templates import IMAGE_PLACEHOLDER, ChatTemplate
from .tokens import IGNORE_INDEX, tokenizer_of, encode_segments, image_token_id, truncate
_USER, _ASSISTANT = "user", "assistant"
# LLaVA JSON roles (ShareGPT spells them user/assistant too)
_LLAVA_ROLES = {"human": _USER, "user": _USER, "gpt": _ASSISTANT, "assistant": _ASSISTANT}


# ------------------------------------------------------------------------------------- reading

def read_records(path: str | Path) -> list:
    """Entries of a JSON array file or a JSONL file (one object per non-blank line)."""
    path = Path(path)
    if not path.is_file():
        raise MatvlmError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise MatvlmError(f"{path}: not valid JSON: {e}") from e
    records = []
    for n, line in enumerate(text.split("\n"), start=1):     # not splitlines: text may hold U+2028
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MatvlmError(f"{path}: line {n} is not valid JSON: {e}") from e
    return records


def _malformed(source: Path, sid: str, what: str) -> MatvlmError:
    return MatvlmError(f"{source}: entry {sid}: {what}")


def _entry_id(entry, index: int) -> str:
    if isinstance(entry, dict) and entry.get("id") is not None:
        return f"{entry['id']!r} (index {index})"
    return f"at index {index}"


def _turns(messages: list[tuple[str, str]], has_image: bool, fail, placeholder: bool = True) -> list[tuple[str, str]]:
    """[(role, text), ...] alternating user/assistant -> [(question, answer), ...], checked. `placeholder`:
    the image placeholder is reserved (VLM data); for a text model it is ordinary text."""
    for k, (role, text) in enumerate(messages):
        expected = _USER if k % 2 == 0 else _ASSISTANT
        if role != expected:
            raise fail(f"message {k} is from the {role}, expected the {expected} "
                       "(turns alternate user, assistant, starting with the user)")
        if placeholder and IMAGE_PLACEHOLDER in text and not (has_image and k == 0):
            where = "the sample has no image" if not has_image else "only the first user message may hold it"
            raise fail(f"message {k} contains {IMAGE_PLACEHOLDER!r} but {where}")
        if not text.strip() and not (has_image and k == 0):
            raise fail(f"message {k} ({role}) is empty")
    if len(messages) % 2:
        raise fail(f"the conversation ends with a user message (message {len(messages) - 1}); expected an answer")
    return [(messages[k][1], messages[k + 1][1]) for k in range(0, len(messages), 2)]


def _messages(entry, list_key: str, role_key: str, text_key: str, roles: dict, fail) -> list[tuple[str, str]]:
    conv = entry.get(list_key)
    if list_key not in entry:
        raise fail(f"missing {list_key!r} (expected a list of messages)")
    if not isinstance(conv, list):
        raise fail(f"{list_key!r} is {type(conv).__name__}; expected a list of messages")
    if not conv:
        raise fail(f"{list_key!r} is empty")
    out = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict) or m.get(role_key) not in roles:
            got = m.get(role_key) if isinstance(m, dict) else type(m).__name__
            raise fail(f"message {k} has role {got!r}; expected one of {', '.join(roles)}")
        if not isinstance(m.get(text_key), str):
            raise fail(f"message {k} {text_key!r} is {type(m.get(text_key)).__name__}, expected a string")
        out.append((roles[m[role_key]], m[text_key]))
    return out


# ------------------------------------------------------------------------------------ datasets

class _ChatDataset(torch.utils.data.Dataset):
    """Shared parts: templated samples kept after the up-front checks, encoded on access."""

    def __init__(self, processor_or_tokenizer, template: ChatTemplate | None, max_length: int):
        if max_length < 1:
            raise MatvlmError(f"max_length must be positive, got {max_length}")
        self.processor = processor_or_tokenizer
        self.tokenizer = tokenizer_of(processor_or_tokenizer)
        self.template = template
        self.max_length = max_length
        self.skipped_too_long = 0
        self.samples: list[dict] = []
        # each kept sample's encoding from the up-front check, kept so that training never tokenizes again:
        # ids as int32 and which of them are labels (5 bytes a token)
        self._ids: list[torch.Tensor] = []
        self._is_label: list[torch.Tensor] = []

    @property
    def pad_token_id(self) -> int:
        """The id `collate` pads with: the tokenizer's pad token, else its eos."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def __len__(self) -> int:
        return len(self.samples)

    def _keep(self, sample: dict) -> None:
        encoded = self._encode(sample)
        if encoded is None:
            self.skipped_too_long += 1
        else:
            self.samples.append(sample)
            ids, labels = encoded
            self._ids.append(ids.to(torch.int32))
            self._is_label.append(labels != IGNORE_INDEX)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each kept sample (batching groups by it)."""
        return [len(ids) for ids in self._ids]

    def _encoded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i's (input_ids, labels), as `_encode` made them when the dataset was built."""
        ids = self._ids[i].long()
        return ids, torch.where(self._is_label[i], ids, IGNORE_INDEX)


class LlavaJsonDataset(_ChatDataset):
    """LLaVA / ShareGPT4V JSON: a list of `{id, image?, conversations: [{from: human|gpt, value}, ...]}`,
    or the same objects as JSONL; text-only samples (no `image`) and multi-turn conversations.

    Every entry is checked when the dataset is built: a malformed one raises `MatvlmError` naming its id
    and what is wrong; one whose image file is missing is counted in `skipped_missing_images` and left
    out (`strict=True`: raises instead); one longer than `max_length` whose cut would remove image tokens
    or every answer token is counted in `skipped_too_long` and left out. Image paths are relative to
    `image_root` (None: the JSON file's folder). Building the dataset tokenises every sample once (to
    know which fit); items are tokenised again when read.

    Items: `{"id": str, "input_ids": (T,) int64, "labels": (T,) int64, "pixel_values": (3, H, W) float32
    or None}`, T <= max_length.
    """

    def __init__(self, json_path: str | Path, image_root: str | Path | None, processor_or_tokenizer,
                 template: ChatTemplate, max_length: int, image_aspect: str = "square", strict: bool = False):
        super().__init__(processor_or_tokenizer, template, max_length)
        if image_aspect not in ASPECTS:
            raise MatvlmError(f"image_aspect must be one of {', '.join(ASPECTS)}, got {image_aspect!r}")
        self.source = Path(json_path)
        self.image_root = Path(image_root) if image_root is not None else self.source.parent
        self.image_aspect = image_aspect
        self.strict = strict
        self.skipped_missing_images = 0
        self._n_image = None  # image tokens per image, known once a processor is needed
        records = read_records(self.source)
        if not isinstance(records, list):
            raise MatvlmError(f"{self.source}: expected a JSON list of samples, got {type(records).__name__}")
        for index, entry in enumerate(records):
            sample = self._parse(entry, index)
            if sample["image"] is not None and not sample["image"].is_file():
                if strict:
                    raise MatvlmError(f"{self.source}: entry {sample['where']}: image {sample['image']} does not exist")
                self.skipped_missing_images += 1
                continue
            self._keep(sample)

    def _parse(self, entry, index: int) -> dict:
        where = _entry_id(entry, index)

        def fail(what):
            return _malformed(self.source, where, what)

        if not isinstance(entry, dict):
            raise fail(f"expected an object, got {type(entry).__name__}")
        image = entry.get("image")
        if image is not None and (not isinstance(image, str) or not image):
            raise fail(f"'image' is {image!r}; expected one image path")
        if image is not None:
            if self._image_count() is None:
                raise fail("has an image but a tokenizer, not a LlavaProcessor, was given")
            image = self.image_root / image
        messages = _messages(entry, "conversations", "from", "value", _LLAVA_ROLES, fail)
        turns = _turns(messages, image is not None, fail)
        sid = str(entry["id"]) if entry.get("id") is not None else str(index)
        return {"id": sid, "where": where, "turns": turns, "image": image, "system": None}

    def _image_count(self) -> int | None:
        if self._n_image is None and hasattr(self.processor, "image_processor"):
            self._n_image = image_token_count(self.processor)
        return self._n_image

    def _encode(self, sample: dict):
        has_image = sample["image"] is not None
        segments = self.template.segments(sample["turns"], has_image, system=sample["system"])
        ids, labels = encode_segments(segments, self.processor, self._image_count() if has_image else 0)
        return truncate(ids, labels, self.max_length, image_token_id(self.processor) if has_image else None)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        input_ids, labels = self._encoded(i)
        pixel_values = None
        if sample["image"] is not None:
            try:
                pixel_values = load_image(sample["image"], self.processor, self.image_aspect)
            except MatvlmError as e:
                raise MatvlmError(f"{self.source}: entry {sample['where']}: {e}") from e
        return {"id": sample["id"], "input_ids": input_ids, "labels": labels, "pixel_values": pixel_values}


class TextJsonlDataset(_ChatDataset):
    """Text-only JSONL, one object a line, either
      `{"text": ...}`: plain text; every token is a label, and the tokenizer's eos is appended so
          documents end; longer texts are cut to `max_length`;
      `{"messages": [{"role": "system|user|assistant", "content": ...}, ...]}`: a chat, templated with
          `template` (an optional first system message replaces its system prompt); labels only on the
          assistant answers and their end-of-turn.
    Checked up front like `LlavaJsonDataset` (malformed lines raise naming `id` or the line index;
    chats whose cut leaves no answer token are counted in `skipped_too_long`).

    Items: `{"id": str, "input_ids": (T,), "labels": (T,), "pixel_values": None}`.
    """

    def __init__(self, jsonl_path: str | Path, processor_or_tokenizer, template: ChatTemplate | None,
                 max_length: int):
        super().__init__(processor_or_tokenizer, template, max_length)
        self.source = Path(jsonl_path)
        for index, entry in enumerate(read_records(self.source)):
            self._keep(self._parse(entry, index))

    def _parse(self, entry, index: int) -> dict:
        where = _entry_id(entry, index)

        def fail(what):
            return _malformed(self.source, where, what)

        if not isinstance(entry, dict) or ("text" in entry) == ("messages" in entry):
            raise fail("expected an object with either 'text' or 'messages'")
        sid = str(entry["id"]) if entry.get("id") is not None else str(index)
        if "text" in entry:
            text = entry["text"]
            if not isinstance(text, str) or not text.strip():
                raise fail(f"'text' must be a non-empty string, got {text!r:.40}")
            return {"id": sid, "where": where, "text": text}
        if self.template is None:
            raise fail("is a chat ('messages') but no chat template was given")
        roles = {"system": "system", "user": _USER, "assistant": _ASSISTANT}
        messages = _messages(entry, "messages", "role", "content", roles, fail)
        system = None
        if messages[0][0] == "system":
            system, messages = messages[0][1], messages[1:]
        if any(role == "system" for role, _ in messages):
            raise fail("a system message may only come first")
        if not messages:
            raise fail("has a system message but no conversation")
        # a text model has no image token: "<image>" is ordinary text here
        return {"id": sid, "where": where, "turns": _turns(messages, False, fail, placeholder=False), "system": system}

    def _encode(self, sample: dict):
        if "text" in sample:
            ids = self.tokenizer(sample["text"])["input_ids"]
            eos = self.tokenizer.eos_token_id
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
            input_ids = torch.tensor(ids[:self.max_length], dtype=torch.long)
            return input_ids, input_ids.clone()
        segments = self.template.segments(sample["turns"], False, system=sample["system"])
        return truncate(*encode_segments(segments, self.tokenizer, images=False), self.max_length)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        input_ids, labels = self._encoded(i)
        return {"id": sample["id"], "input_ids": input_ids, "labels": labels, "pixel_values": None}


# ------------------------------------------------------------------------------------- batching

def collate(items: list[dict], pad_token_id: int, multiple_of: int = 1) -> dict:
    """Right-pad a list of dataset items into a batch: to the longest item, rounded up to `multiple_of` when
    the items' lengths differ (a batch of equal lengths stays unpadded: no mask, attention's causal path).

    Returns:
        input_ids (B, T) padded with `pad_token_id`, attention_mask (B, T) 1 on tokens / 0 on pads,
        labels (B, T) -100 on pads, pixel_values (n_images, 3, H, W) of the items that have an image
        in batch order (None when none has), ids (list of B str).
    """
    if not items:
        raise MatvlmError("collate needs at least one item")
    if pad_token_id is None:
        raise MatvlmError("collate needs a pad_token_id (the tokenizer has neither pad nor eos token)")
    if multiple_of < 1:
        raise MatvlmError(f"collate pads to a multiple of at least 1; got {multiple_of}")
    lengths = [len(x["input_ids"]) for x in items]
    B, T = len(items), max(lengths)
    if min(lengths) < T:
        T = -(-T // multiple_of) * multiple_of
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        input_ids[b, :n] = x["input_ids"]
        attention_mask[b, :n] = 1
        labels[b, :n] = x["labels"]
    images = [x["pixel_values"] for x in items if x.get("pixel_values") is not None]
    pixel_values = torch.stack(images) if images else None  # (n_images, 3, H, W)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "pixel_values": pixel_values, "ids": [x["id"] for x in items]}
