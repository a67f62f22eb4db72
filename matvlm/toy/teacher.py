"""The embedded default teacher: a tiny LLaVA trained on Shapes-VQA, and its reproducible recipe.

    matvlm toy train-teacher --out DIR        (GPU: minutes; CPU: about an hour)

Architecture (a transformers `LlavaForConditionalGeneration`, so everything downstream treats it
like any llava-hf model): a SigLIP vision tower (64 px images, 8 px patches: 64 image tokens,
4 layers, width 128), the 2-layer GELU connector, and a Phi decoder with 8 layers, width 192,
3 heads of 64, partial rotary 0.5 (as Phi-1.5: 0.4 of 64 is not an even rotary width). The tokenizer is a byte-level BPE trained on the rendered
Shapes-VQA conversations (plain template), so answers are a few tokens and decoding is exact.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers import SiglipVisionConfig

from . import shapes
from ..compat import SiglipImageProcessor
from .tiny import CHAT_TEMPLATE, EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN

TEMPLATE = "plain"


@dataclass
class ToyArch:
    n_layer: int = 8
    hidden: int = 192
    heads: int = 3
    intermediate: int = 768
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 512
    image_size: int = 64
    patch: int = 8
    vocab: int = 384


@dataclass
class ToyRecipe:
    """How the shipped teacher was trained (defaults reproduce it)."""

    n_train_images: int = 30_000
    questions_per_image: int = 6
    n_test_images: int = 500
    data_seed: int = 0
    steps: int = 6_000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 300
    weight_decay: float = 0.05
    seed: int = 0


def question_of(record: dict) -> str:
    """The question of a Shapes-VQA JSON record (its first human turn without the image placeholder)."""
    return record["conversations"][0]["value"].replace(IMAGE_TOKEN, "").strip()


def conversation_texts(records: list[dict]) -> list[str]:
    """Each Shapes-VQA record rendered with the plain template (training text, answers included)."""
    from ..inputs.templates import get_template

    t = get_template(TEMPLATE, eos_token=EOS_TOKEN)
    return ["".join(text for text, _ in t.segments([(question_of(r), r["answer"])], has_image=True))
            for r in records]


def train_tokenizer(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` with <|endoftext|>, <pad>, <image> special tokens (deterministic)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build(tokenizer: PreTrainedTokenizerFast, arch: ToyArch = ToyArch(), seed: int = 0):
    """A randomly initialised toy LLaVA and its processor."""
    text = AutoConfig.for_model(
        "phi", vocab_size=len(tokenizer), hidden_size=arch.hidden, num_hidden_layers=arch.n_layer,
        num_attention_heads=arch.heads, num_key_value_heads=arch.heads, intermediate_size=arch.intermediate,
        partial_rotary_factor=0.5, max_position_embeddings=512, resid_pdrop=0.0, embd_pdrop=0.0,
        attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
                                num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                                image_size=arch.image_size, patch_size=arch.patch)
    n_img = (arch.image_size // arch.patch) ** 2
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                      projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="full",
                      image_seq_length=n_img, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    ip = SiglipImageProcessor(size={"height": arch.image_size, "width": arch.image_size}, image_mean=[0.5] * 3,
                              image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=arch.patch,
                          vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE)
    return model, proc


def _stack(arrays):
    import numpy as np

    return torch.from_numpy(np.stack(arrays))


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, processor):
        self.paths, self.processor = paths, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from ..inputs.images import load_image

        return load_image(self.paths[i], self.processor, "square").numpy()


def _encode_batched(records: list[dict], template, processor, n_img: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`encode_segments` of every record, with the tokenizer run once over all texts.

    Valid for the toy's byte-level BPE and plain template: its pieces (prompt ending in ":",
    answer starting with a space, "\\n") never merge across a boundary, so tokenising them apart
    equals tokenising the whole text (`encode_split` checks this on the first record).
    """
    tok = processor.tokenizer
    pieces = [template.segments([(question_of(r), r["answer"])], has_image=True) for r in records]
    width = len(pieces[0])
    flat = [text for segs in pieces for text, _ in segs]
    ids = tok(flat, add_special_tokens=False)["input_ids"]
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    out = []
    for k, segs in enumerate(pieces):
        x, y = [], []
        for (text, is_answer), t in zip(segs, ids[k * width:(k + 1) * width]):
            t = [u for v in t for u in ([image_id] * n_img if v == image_id else [v])]
            x += t
            y += t if is_answer else [-100] * len(t)
        out.append((torch.tensor(x), torch.tensor(y)))
    return out


def encode_split(json_path: Path, processor, num_workers: int = 4) -> dict[str, torch.Tensor]:
    """A whole Shapes-VQA split as padded tensors: input_ids / labels / attention_mask (N, L),
    image index (N,), and each distinct image once in pixels (n_images, 3, H, W) float16.

    Keeping the split in a few tensors (on the GPU during training) removes per-step collation,
    which otherwise dominates the step time of a model this small.
    """
    from ..inputs.images import image_token_count
    from ..inputs.tokens import encode_segments
    from ..inputs.templates import get_template

    records = shapes.load_samples(json_path)
    template = get_template(TEMPLATE, eos_token=EOS_TOKEN)
    paths = sorted({r["image"] for r in records})
    index = {p: i for i, p in enumerate(paths)}
    n_img = image_token_count(processor)
    encoded = _encode_batched(records, template, processor, n_img)
    check = encode_segments(template.segments([(question_of(records[0]), records[0]["answer"])], has_image=True),
                            processor, n_image_tokens=n_img)
    if not (torch.equal(check[0], encoded[0][0]) and torch.equal(check[1], encoded[0][1])):
        raise RuntimeError("batched toy encoding differs from encode_segments")   # guards the shortcut below
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id
    ids = torch.full((len(records), length), pad, dtype=torch.long)
    labels = torch.full((len(records), length), -100, dtype=torch.long)
    mask = torch.zeros((len(records), length), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = x, y, 1
    loader = torch.utils.data.DataLoader(_ImageFiles([json_path.parent / p for p in paths], processor),
                                         batch_size=256, num_workers=num_workers,
                                         collate_fn=_stack)
    pixels = torch.cat(list(loader)).half()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "image": torch.tensor([index[r["image"]] for r in records]), "pixels": pixels}


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(out: str | Path, recipe: ToyRecipe = ToyRecipe(), arch: ToyArch = ToyArch(), device: str | None = None,
          num_workers: int = 4, log=print, run_eval: bool = True) -> dict:
    """Generate the data, train the teacher from scratch, evaluate it, and write the teacher directory.

    Returns the held-out accuracy (overall and per question type), also written to
    `out/training.json` with the recipe.
    """
    from ..model.io import atomic_dir

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    data_dir = out.parent / f"{out.name}-data"
    splits = shapes.make_splits(data_dir, n_train=recipe.n_train_images, n_test=recipe.n_test_images,
                                seed=recipe.data_seed, questions_per_image=recipe.questions_per_image)
    train_samples = shapes.load_samples(splits["train"])
    tokenizer = train_tokenizer(conversation_texts(train_samples[:6000]), arch.vocab)
    model, proc = build(tokenizer, arch, recipe.seed)
    t0 = time.time()
    data = {k: v.to(device) for k, v in encode_split(Path(splits["train"]), proc, num_workers).items()}
    n = data["input_ids"].shape[0]
    log(f"encoded {n} training samples ({data['pixels'].shape[0]} images) in {time.time() - t0:.0f}s")

    model.to(device).train()
    decay = [p for n_, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n_, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, recipe.steps, recipe.warmup))
    g = torch.Generator().manual_seed(recipe.seed)
    order, pos = torch.randperm(n, generator=g).to(device), 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.time()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > n:
            order, pos = torch.randperm(n, generator=g).to(device), 0
        idx = order[pos:pos + recipe.batch_size]
        pos += recipe.batch_size
        with amp:
            loss = model(input_ids=data["input_ids"][idx], attention_mask=data["attention_mask"][idx],
                         pixel_values=data["pixels"][data["image"][idx]].float(), labels=data["labels"][idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == recipe.steps - 1:
            log(f"step {step + 1}/{recipe.steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    train_s = time.time() - t0
    model.eval()

    from ..convert.formats import load
    from ..model.hybrid import hybrid_config_for, make_hybrid

    model.to(torch.bfloat16).float()                 # evaluate exactly the weights that are shipped (bf16)
    make_hybrid(model, hybrid_config_for(model, []))
    info = {"recipe": asdict(recipe), "arch": asdict(arch), "train_seconds": train_s, "device": device}
    with atomic_dir(out, overwrite=True) as tmp:
        LlavaForConditionalGeneration.save_pretrained(model.to(torch.bfloat16), tmp)
        proc.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
    model.float()
    if not run_eval:
        return {}
    result = evaluate(model, proc, splits["test"], device=device)
    log(f"held-out accuracy {result['overall']:.4f} {result['per_qtype']}")
    write_heldout(out, result)
    load(out)                                        # the written teacher loads
    return result


def write_heldout(teacher_dir: str | Path, result: dict) -> None:
    """Record a held-out evaluation in the teacher's training.json (atomically)."""
    from ..model.io import atomic_write_text

    path = Path(teacher_dir) / "training.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    info["heldout"] = result
    atomic_write_text(path, json.dumps(info, indent=1))


@torch.no_grad()
def evaluate(model, processor, test_json: str | Path, device: str = "cpu", batch_size: int = 64,
             limit: int | None = None) -> dict:
    """Greedy answers of `model` on a Shapes-VQA split; `shapes.accuracy` of them."""
    from ..engine.simple import answer_batch

    samples = shapes.load_samples(test_json)[:limit]
    root = Path(test_json).parent
    preds = {}
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        answers = answer_batch(model, processor, [question_of(r) for r in chunk],
                               [root / r["image"] for r in chunk], template=TEMPLATE, max_new_tokens=48,
                               device=device)
        preds.update({r["id"]: a for r, a in zip(chunk, answers)})
    return shapes.accuracy(preds, samples)
