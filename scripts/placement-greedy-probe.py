"""Does placement that scores layers together choose better than per-layer scores? A probe on the toy VLM.

    python scripts/placement-greedy-probe.py [M]        (CPU, about a minute; needs /tmp/toyst from toy-stages.sh)

Every layer's mixer is aligned as `--placement auto` does (100 align steps, the toy recipe), then M layers
(default 4 = 50 %) are chosen greedily: each round adds the layer whose replacement, together with those
chosen before, gives the lowest mean token KL(teacher || hybrid) on 32 training samples. Prints each
round's scores and the set KL of the greedy, even (0, 2, 4, 6) and per-layer auto (2, 4, 5, 6) choices.
A research probe (docs/results.md), not a matvlm feature.
"""
import json, sys, torch
from pathlib import Path
from matvlm.convert import formats
from matvlm.distill.config import DistillConfig
from matvlm.distill.train import make_dataset, run
from matvlm.distill.placement import _log_probs
from matvlm.model.hybrid import decoder_layers, hybrid_config_for, make_hybrid
from matvlm.inputs.data import collate
from matvlm.toy.demo import ASSET

W = Path("/tmp/greedy"); W.mkdir(exist_ok=True)
cfg = DistillConfig(teacher=str(ASSET), data="/tmp/toyst/data/train.json", out=str(W / "align"), mamba_ratio=1.0,
                    stage="align", max_steps=100, train=["mamba"], global_batch_size=8, micro_batch_size=8, lr=3e-3,
                    alpha=0.02, template="plain", save_every=100, tensorboard=False)
if not (W / "align" / "config.json").is_file():
    run(cfg, progress=False)
teacher = formats.load(str(ASSET), dtype=torch.float32)
aligned = formats.load(str(W / "align"), dtype=torch.float32)
proc = formats.load_processor(str(ASSET))
ds = make_dataset(cfg, proc, teacher.config)
n = len(ds); samples = sorted({round(k * (n - 1) / 31) for k in range(32)})
tok = getattr(proc, "tokenizer", proc)
mixers = aligned.mamba_mixers
L = len(decoder_layers(teacher))
batches = []
for b in range(0, len(samples), 8):
    bt = collate([ds[i] for i in samples[b:b + 8]], tok.pad_token_id)
    inp = {"input_ids": bt["input_ids"], "attention_mask": bt["attention_mask"]}
    if bt.get("pixel_values") is not None:
        inp["pixel_values"] = bt["pixel_values"].float()
    batches.append(inp)

@torch.no_grad()
def set_kl(layers):
    import copy
    m = copy.deepcopy(teacher)
    make_hybrid(m, hybrid_config_for(m, list(layers)))
    for l in layers:
        m.mamba_mixers[l].load_state_dict(mixers[l].state_dict())
    kl = tokens = 0.0
    for inp in batches:
        mask = inp["attention_mask"].bool()
        t = _log_probs(teacher(**inp, use_cache=False).logits)[mask]
        s = _log_probs(m(**inp, use_cache=False).logits)[mask]
        kl += float((t.exp() * (t - s)).sum()); tokens += int(mask.sum())
    return kl / tokens

chosen = []
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 4):
    scores = {l: set_kl(chosen + [l]) for l in range(L) if l not in chosen}
    best = min(scores, key=scores.get)
    print("add", best, {k: round(v, 3) for k, v in scores.items()}, flush=True)
    chosen.append(best)
print("greedy", sorted(chosen), "set KL", round(set_kl(chosen), 3))
for name, s in (("even", [0, 2, 4, 6]), ("auto", [2, 4, 5, 6])):
    print(name, s, "set KL", round(set_kl(s), 3))
