"""`--placement auto`: which attention layers to replace, chosen by measured sensitivity (issue 16).

Even spacing (the paper's default) ignores that some layers' attention is easy to imitate with a
linear recurrence and others are not. Here every layer is measured:

1. **Align all at once.** The teacher is converted with every layer a Mamba-2 mixer and the mixers are
   trained with the align stage (`distill --stage align`): each mixer learns to reproduce its own teacher
   layer from the teacher's hidden state. The layer losses are independent, so one run aligns every
   layer's mixer as if each had been aligned alone.
2. **Score each alone.** For each layer l, the teacher with only layer l's attention swapped for its
   aligned mixer is run on held-out samples of the data, and its mean token KL(teacher || that model) is
   layer l's score: the damage replacing l alone does.
3. **Choose** the layers with the lowest scores for the requested ratio.

The scores, the choice and the settings are written to `placement.json` beside the checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..convert.layers import count_for_ratio
from ..errors import MatvlmError
from ..model.io import atomic_write_text
from .config import DistillConfig

REPORT = "placement.json"


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax in float32 at least (float64 stays float64)."""
    return torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)


@torch.no_grad()
def layer_scores(teacher, aligned, dataset, pad_token_id: int, samples: list[int], batch_size: int = 8,
                 device: str | torch.device = "cpu") -> tuple[list[float], int]:
    """Mean token KL(teacher || teacher with layer l's attention replaced by `aligned`'s mixer l), per layer.

    teacher: the loaded teacher (a matvlm-loaded transformers model, no Mamba layers); aligned: a hybrid of
    the same teacher whose every layer is a Mamba-2 mixer. Returns (scores, tokens scored)."""
    from ..model.hybrid import decoder_layers, hybrid_config_for, make_hybrid
    from ..inputs.data import collate

    teacher = teacher.to(device).eval()
    layers = decoder_layers(teacher)
    mixers = aligned.mamba_mixers
    if sorted(mixers) != list(range(len(layers))):
        raise MatvlmError("the aligned model must have a Mamba-2 mixer in every layer")
    empty = teacher.hybrid_config
    kl = [0.0] * len(layers)
    tokens = 0
    for b in range(0, len(samples), batch_size):
        batch = collate([dataset[i] for i in samples[b:b + batch_size]], pad_token_id)
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if batch.get("pixel_values") is not None:
            inputs["pixel_values"] = batch["pixel_values"].to(device, next(teacher.parameters()).dtype)
        mask = inputs["attention_mask"].bool()
        t_logp = _log_probs(teacher(**inputs, use_cache=False).logits)[mask]                      # (N, V)
        tokens += int(mask.sum())
        for l in range(len(layers)):
            replaced = make_hybrid(teacher, hybrid_config_for(teacher, [l]))
            teacher.mamba_mixers[l].load_state_dict(mixers[l].state_dict())
            s_logp = _log_probs(teacher(**inputs, use_cache=False).logits)[mask]
            kl[l] += float((t_logp.exp() * (t_logp - s_logp)).sum())
            layers[l].self_attn = replaced[l]
            teacher.hybrid_config = empty
    return [k / max(tokens, 1) for k in kl], tokens


def choose(scores: list[float], ratio: float, gap: int = 1) -> list[int]:
    """The `ratio` of layers whose replacements alone hurt least together (the lowest sum of scores), in layer
    order, any two at least `gap` layers apart (1: neighbours allowed, which is the plain lowest scores)."""
    n = len(scores)
    m = count_for_ratio(n, ratio)
    if gap < 1:
        raise MatvlmError(f"--placement-gap must be >= 1, got {gap}")
    if gap == 1:
        return sorted(sorted(range(n), key=lambda l: (scores[l], l))[:m])
    if (m - 1) * gap + 1 > n:
        raise MatvlmError(f"{m} Mamba layers at least {gap} apart do not fit in {n} layers; lower --placement-gap "
                          f"(at most {(n - 1) // max(m - 1, 1)} here)")
    inf = float("inf")
    # cost[j][i]: the least sum of j + 1 chosen scores whose last layer is i; back[j][i]: the layer before it
    cost = [[scores[i] for i in range(n)]] + [[inf] * n for _ in range(m - 1)]
    back = [[-1] * n for _ in range(m)]
    for j in range(1, m):
        best, arg = inf, -1                        # the best cost[j - 1][k] over k <= i - gap, lowest k on ties
        for i in range(n):
            k = i - gap
            if k >= 0 and cost[j - 1][k] < best:
                best, arg = cost[j - 1][k], k
            if arg >= 0:
                cost[j][i], back[j][i] = best + scores[i], arg
    last = min(range(n), key=lambda i: (cost[m - 1][i], i))
    layers = [last]
    for j in range(m - 1, 0, -1):
        layers.append(back[j][layers[-1]])
    return sorted(layers)


def auto_layers(cfg: DistillConfig, ratio: float, work: Path, align_steps: int = 100, eval_samples: int = 32,
                progress: bool = True) -> dict:
    """Measure every layer's sensitivity for `cfg.teacher` on `cfg.data` and choose the layers for `ratio`.

    The align run uses cfg's data, batch sizes, lr, max_length, template and seed (its own stage and step
    count); it is written to `work/align` (resumable) and removed once scored. Returns the report:
    {"method", "ratio", "layers", "scores", "align_steps", "eval_samples", "eval_tokens", "data"}."""
    from ..convert import formats
    from .train import make_dataset, run

    count_for_ratio(1, ratio)
    if align_steps < 1 or eval_samples < 1:
        raise MatvlmError("--placement-steps and the number of scoring samples must be >= 1")
    align_dir = work / "align"
    align = DistillConfig(**{**cfg.to_dict(), "student": None, "mamba_ratio": 1.0, "placement": "even",
                             "placement_gap": 1, "compile": False, "stage": "align", "align_steps": None,
                             "align_lr": None, "max_steps": align_steps,
                             "train": ["mamba"], "out": str(align_dir), "save_every": max(1, align_steps // 4),
                             "keep_last": 1, "tensorboard": False, "wandb": False})
    if not (align_dir / "config.json").is_file():
        run(align, resume=(align_dir / "distill_config.json").is_file(), progress=progress)
    teacher = formats.load(cfg.teacher, dtype=torch.float32)
    aligned = formats.load(align_dir, dtype=torch.float32)
    processor = formats.load_processor(cfg.teacher)
    dataset = make_dataset(cfg, processor, teacher.config)
    n = len(dataset)
    samples = sorted({round(k * (n - 1) / max(1, eval_samples - 1)) for k in range(min(eval_samples, n))})
    tok = getattr(processor, "tokenizer", processor)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores, tokens = layer_scores(teacher, aligned, dataset, tok.pad_token_id, samples, device=device)
    layers = choose(scores, ratio, cfg.placement_gap)
    report = {"method": "auto: KL(teacher || teacher with one layer replaced by its aligned mixer), lowest first",
              "ratio": ratio, "gap": cfg.placement_gap, "layers": layers, "scores": scores, "align_steps": align_steps,
              "eval_samples": len(samples), "eval_tokens": tokens, "data": str(cfg.data)}
    shutil.rmtree(align_dir, ignore_errors=True)
    return report


def write_report(report: dict, out: Path) -> None:
    atomic_write_text(Path(out) / REPORT, json.dumps(report, indent=1) + "\n")
