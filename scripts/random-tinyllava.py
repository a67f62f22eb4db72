"""A random-weight VLM directory at TinyLLaVA-3.1B's shapes, for serving and speed benchmarks (issue 20).

    python scripts/random-tinyllava.py --tokenizer DIR --out DIR [--device cuda] [--small]

The decoder and vision tower have TinyLLaVA-3.1B's shapes (`matvlm.bench.distill_step.tinyllava_config`:
Phi-2 decoder 32 x 2560, SigLIP-384 tower, 728 image tokens); the vocabulary is the tokenizer's in DIR
(any local tokenizer, e.g. SmolLM2's: 49 152 tokens against Phi-2's 51 200) plus `<image>`, so every
token the random model samples can be detokenised. The directory has a `LlavaProcessor` (SigLIP
processor, TinyLLaVA's chat template) and loads with `matvlm serve`, `bench-serve` and `convert`.
`--small` writes a model of the same layout with tiny widths, for trying the pipeline on a CPU.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor, SiglipImageProcessor

    from matvlm.bench.distill_step import tinyllava_config
    from matvlm.toy.tiny import CHAT_TEMPLATE, IMAGE_TOKEN

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a local directory with tokenizer files")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny widths, same layout (CPU trials)")
    args = ap.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = tinyllava_config()
    cfg.text_config.vocab_size = len(tok)
    cfg.text_config.pad_token_id = tok.pad_token_id
    cfg.text_config.eos_token_id = tok.eos_token_id
    cfg.text_config.bos_token_id = tok.bos_token_id
    cfg.image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if args.small:
        for k, v in dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=128).items():
            setattr(cfg.text_config, k, v)
        for k, v in dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2).items():
            setattr(cfg.vision_config, k, v)
    size = cfg.vision_config.image_size
    ip = SiglipImageProcessor(size={"height": size, "width": size}, do_resize=True, do_rescale=True,
                              do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlavaForConditionalGeneration(cfg)
    model.to(torch.bfloat16).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    print(f"wrote {args.out}: {n / 1e9:.2f}B parameters, vocabulary {len(tok)}, "
          f"{cfg.image_seq_length} image tokens")


if __name__ == "__main__":
    main()
