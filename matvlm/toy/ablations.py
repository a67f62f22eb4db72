"""The paper's ablations (Tables 2-4) at toy scale: Mamba ratio, placement, and distillation losses.

    matvlm toy ablations --out DIR [--steps 450] [--eval-images 200]

Every configuration starts from the shipped toy teacher, converts it, distils it with the same budget
(the demo's: batch 8, lr 3e-3), and is scored on the same held-out Shapes-VQA questions. Writes
ablations.json, ablations.md (accuracy per type and retention vs the teacher) and curves.png (the
distillation loss curves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import shapes
from .demo import ASSET
from .teacher import evaluate

# name -> (mamba ratio, placement, alpha, beta, gamma); the paper's defaults are even placement,
# L_prob + L_layer; alpha is scaled (0.02) as in the demo because per-token layer distances are ~30x the KL.
CONFIGS = {
    "25% even, L_prob + L_layer": (0.25, "even", 0.02, 1.0, 0.0),
    "12.5% even": (0.125, "even", 0.02, 1.0, 0.0),
    "50% even": (0.5, "even", 0.02, 1.0, 0.0),
    "25% begin": (0.25, "begin", 0.02, 1.0, 0.0),
    "25% middle": (0.25, "middle", 0.02, 1.0, 0.0),
    "25% end": (0.25, "end", 0.02, 1.0, 0.0),
    "25% even, L_prob only": (0.25, "even", 0.0, 1.0, 0.0),
    "25% even, L_layer only": (0.25, "even", 1.0, 0.0, 0.0),
    "25% even, L_ce only": (0.25, "even", 0.0, 0.0, 1.0),
    "25% even, L_prob + L_layer + L_ce": (0.25, "even", 0.02, 1.0, 1.0),
}


def run(out: Path, steps: int = 450, eval_images: int = 200, configs: list[str] | None = None,
        log=lambda line: None) -> dict:
    import matvlm

    from ..convert import convert
    from ..distill.config import DistillConfig
    from ..distill.train import run as distill

    out.mkdir(parents=True, exist_ok=True)
    splits = shapes.make_splits(out / "data", n_train=1000, n_test=eval_images, seed=1000, questions_per_image=6)
    proc = matvlm.load_processor(ASSET)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def score(path):
        model = matvlm.load(path, dtype="float32").to(device)
        return evaluate(model, proc, splits["test"], device=device, batch_size=256)

    results = {"teacher": score(ASSET), "runs": {}, "steps": steps, "device": device,
               "date": time.strftime("%Y-%m-%d")}
    log(f"teacher: {results['teacher']['overall']:.4f}")
    for name in configs or list(CONFIGS):
        ratio, placement, alpha, beta, gamma = CONFIGS[name]
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        t0 = time.time()
        init = convert(ASSET, out / slug / "init", mamba_ratio=ratio, placement=placement, overwrite=True)
        cfg = DistillConfig(teacher=str(ASSET), student=str(init), data=str(splits["train"]), out=str(out / slug / "run"),
                            template="plain", max_steps=steps, global_batch_size=8, micro_batch_size=8, lr=3e-3,
                            alpha=alpha, beta=beta, gamma=gamma, save_every=10 ** 9, tensorboard=False)
        distill(cfg, progress=False)
        r = score(out / slug / "run")
        r["mamba_layers"] = matvlm.load(init).hybrid_config.mamba_layers
        r["retention"] = r["overall"] / results["teacher"]["overall"]
        r["curve"] = [(x["step"], x["loss"], x["loss_prob"], x["loss_layer"], x["loss_ce"])
                      for x in map(json.loads, (out / slug / "run" / "log.jsonl").read_text().splitlines())]
        r["seconds"] = time.time() - t0
        results["runs"][name] = r
        log(f"{name}: {r['overall']:.4f} (retention {r['retention']:.3f}) in {r['seconds']:.0f}s")
        (out / "ablations.json").write_text(json.dumps(results, indent=1))
    (out / "ablations.md").write_text(table(results))
    plot(results, out / "curves.png")
    return results


def table(results: dict) -> str:
    q = list(shapes.QTYPES)
    lines = ["| configuration | Mamba layers | " + " | ".join(q) + " | overall | retention |",
             "|---|---|" + "---|" * (len(q) + 2)]
    t = results["teacher"]
    lines.append("| teacher | — | " + " | ".join(f"{100 * t['per_qtype'][k]:.1f}" for k in q)
                 + f" | {100 * t['overall']:.1f} | 100 % |")
    for name, r in results["runs"].items():
        lines.append(f"| {name} | {r['mamba_layers']} | " + " | ".join(f"{100 * r['per_qtype'][k]:.1f}" for k in q)
                     + f" | {100 * r['overall']:.1f} | {100 * r['retention']:.1f} % |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results["runs"].items():
        steps = [c[0] for c in r["curve"]]
        kl = [c[2] for c in r["curve"]]
        if all(v is not None for v in kl):
            axes[0].plot(steps, kl, label=name, lw=1)
        acc_label = f"{name} ({100 * r['overall']:.0f} %)"
        axes[1].plot(steps, [c[1] for c in r["curve"]], label=acc_label, lw=1)
    axes[0].set(title="L_prob (KL to the teacher), per token", xlabel="step", yscale="log")
    axes[1].set(title="total loss (held-out accuracy in the legend)", xlabel="step", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
