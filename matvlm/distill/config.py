"""`DistillConfig`: every setting of a distillation run, with the paper's defaults (§4.1).

A YAML recipe is only its serialisation: keys are the field names. `from_sources` merges a file
and command-line overrides (flags win).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..errors import MatvlmError

TRAINABLE_GROUPS = ("mamba", "connector", "mlp", "all")
STAGES = ("e2e", "align", "both")
PLACEMENTS = ("even", "begin", "middle", "end", "auto")   # convert.layers.PLACEMENTS + auto (kept here: importing
                                                         # matvlm.convert loads transformers, this module must not)


@dataclass
class DistillConfig:
    """Every setting of a distillation run. Defaults follow MaTVLM §4.1 unless noted. This docstring is
    also the help of `matvlm distill`'s flags, one per field (`a_b` is `--a-b`).

    Attributes:
        teacher: the original model directory (kept frozen).
        student: hybrid init directory from `matvlm convert` (omit it and give --mamba-ratio to convert here).
        data: LLaVA/ShareGPT4V JSON or JSONL (VLM), or text JSONL with "text" or "messages" (causal LM).
        image_root: folder the data's image paths are relative to (default: the data file's folder).
        out: output directory (final hybrid at its top level, checkpoints/step-N/, log.jsonl; must be new or
            empty unless --resume).
        mamba_ratio: fraction of layers to convert when --student is not given.
        placement: where converted layers go when --student is not given; auto = by measured sensitivity on
            --data (see `matvlm convert --help`; the student it converts is kept in OUT/placement/ and the
            scores in OUT/placement.json).
        placement_gap: auto placement: the least distance between two Mamba layers (1: neighbours allowed;
            e.g. 3 at 25 % of 30 layers keeps them spread as even spacing does, on the lowest-scoring layers).
        template: chat template of the data (default: by decoder family; phi = TinyLLaVA's).
        max_length: maximum tokens per sample; longer ones are truncated, never inside an image.
        image_aspect: pad to square with the mean colour, or square resize (default: the teacher's
            `image_aspect_ratio` if it has one, else square).
        max_steps: optimizer steps (default: --epochs over the data).
        epochs: passes over the data (--max-steps wins when given).
        global_batch_size: samples per optimizer step over all processes (paper: 64).
        micro_batch_size: samples per forward pass per process; accumulation makes up the rest.
        micro_batch_tokens: cut micro-batches by positions instead (rows x the longest row, at most this many,
            before the padding to a multiple of 32 on CUDA; a longer row goes alone), so a forward takes more
            rows when rows are short: on a GPU a micro-batch of short rows otherwise costs nearly what a long
            one does. Each step still sums the same samples
            (--micro-batch-size no longer applies). Needs --loss-reduction mean; not with FSDP or DeepSpeed.
        lr: peak learning rate of the warmup-stable-decay schedule.
        weight_decay: AdamW weight decay (none on 1-D parameters and biases).
        adam_betas: AdamW betas, two values.
        warmup_ratio: fraction of the steps of linear warmup.
        decay_ratio: fraction of the steps of linear decay at the end.
        max_grad_norm: gradient clipping norm (not stated in the paper).
        alpha: weight of the layer loss L_layer.
        beta: weight of the KL loss L_prob.
        gamma: weight of the cross-entropy loss L_ce.
        temperature: softmax temperature of the KL loss.
        stage: e2e = the paper's single stage; align = attention transfer only (each Mamba layer learns,
            alone, to reproduce its teacher layer's output from the teacher's hidden states: layer loss
            alone, no LM head, no student forward through other layers; after LoLCATs); both = align for
            --align-steps, then e2e.
        align_steps: steps of the align stage under --stage both (default: a quarter of --max-steps).
        align_lr: peak learning rate of the align stage (default: --lr); each stage has its own schedule.
        loss_reduction: mean per real token (matvlm's default) or sum (MaTVLM's unnormalised sums).
        train: parameter groups that train, comma-separated: mamba, connector (the paper's), mlp (the MLPs of
            the Mamba layers), all.
        save_every: checkpoint every N optimizer steps, and at the end.
        keep_last: keep only the newest N checkpoints (default: all).
        seed: seed of the data order and the Mamba init.
        group_by_length: group samples of similar length into the same steps (each run of 32 steps is sorted
            by length, cut into steps and taken in shuffled order), so micro-batches pad far less; every
            epoch still sees every sample once.
        gradient_checkpointing: recompute decoder layers in the backward pass to save memory.
        compile: torch.compile each attention layer whole (norms, attention, residuals, MLP) and the norms and
            MLP of each Mamba layer (its mixer runs as it is); shapes are dynamic, as lengths vary. The first
            steps wait for the compilation. Same losses as eager (tested); whether it is faster depends on
            the model and GPU: time a few steps with and without it first. Not with FSDP or DeepSpeed.
        mixed_precision: auto = bf16 on CUDA, fp32 on CPU.
        strict: fail on a missing image instead of counting and skipping it.
        num_workers: data-loading worker processes.
        tensorboard: also log to OUT/tensorboard when tensorboard is installed (log.jsonl is always written).
        wandb: also log to Weights & Biases (needs wandb).
    """

    teacher: str = ""
    data: str = ""
    out: str = ""
    student: str | None = None
    mamba_ratio: float | None = None
    placement: Literal["even", "begin", "middle", "end", "auto"] = "even"
    placement_gap: int = 1
    image_root: str | None = None
    template: Literal["phi", "vicuna", "chatml", "plain"] | None = None
    max_length: int = 2048
    image_aspect: Literal["pad", "square"] | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    global_batch_size: int = 64
    micro_batch_size: int = 4
    micro_batch_tokens: int | None = None
    lr: float = 2e-4
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.1
    decay_ratio: float = 0.1
    max_grad_norm: float = 1.0
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 1.0
    stage: Literal["e2e", "align", "both"] = "e2e"
    align_steps: int | None = None
    align_lr: float | None = None
    loss_reduction: Literal["mean", "sum"] = "mean"
    train: list[str] = field(default_factory=lambda: ["mamba", "connector"])
    save_every: int = 500
    keep_last: int | None = None
    seed: int = 0
    group_by_length: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"
    strict: bool = False
    num_workers: int = 0
    tensorboard: bool = True
    wandb: bool = False

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.train, str):
            self.train = [t.strip() for t in self.train.split(",") if t.strip()]

    def validate(self) -> None:
        """Check values; raise MatvlmError naming the first bad one."""
        def bad(msg):
            raise MatvlmError(msg)

        for name in ("teacher", "data", "out"):
            if not getattr(self, name):
                bad(f"distill needs --{name} (or `{name}:` in the config file)")
        if self.student is None and self.mamba_ratio is None:
            bad("give --student HYBRID_INIT_DIR, or --mamba-ratio to convert the teacher on the fly")
        if self.mamba_ratio is not None and not 0 < self.mamba_ratio <= 1:
            bad(f"--mamba-ratio must be in (0, 1], got {self.mamba_ratio}")
        for name in ("global_batch_size", "micro_batch_size", "max_length", "save_every"):
            if getattr(self, name) < 1:
                bad(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 1:
            bad(f"--micro-batch-tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.micro_batch_tokens is not None and self.loss_reduction != "mean":
            bad("--micro-batch-tokens needs --loss-reduction mean (sum normalises each micro-batch by its own size)")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            bad(f"--epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            bad(f"--lr must be > 0, got {self.lr}")
        if not (0 <= self.warmup_ratio and 0 <= self.decay_ratio and self.warmup_ratio + self.decay_ratio <= 1):
            bad(f"warmup_ratio + decay_ratio must lie in [0, 1], got {self.warmup_ratio} + {self.decay_ratio}")
        if min(self.alpha, self.beta, self.gamma) < 0 or self.alpha + self.beta + self.gamma == 0:
            bad(f"loss weights must be >= 0 and not all 0, got alpha={self.alpha} beta={self.beta} gamma={self.gamma}")
        if self.placement not in PLACEMENTS:
            bad(f"--placement must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.placement_gap < 1:
            bad(f"--placement-gap must be >= 1, got {self.placement_gap}")
        if self.placement_gap != 1 and self.placement != "auto":
            bad(f"--placement-gap goes with --placement auto, got --placement {self.placement}")
        if self.stage not in STAGES:
            bad(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.align_steps is not None and (self.align_steps < 1 or self.stage != "both"):
            bad(f"--align-steps takes a count >= 1 and goes with --stage both, got {self.align_steps} "
                f"with --stage {self.stage}")
        if self.align_lr is not None and self.align_lr <= 0:
            bad(f"--align-lr must be > 0, got {self.align_lr}")
        if self.temperature <= 0:
            bad(f"--temperature must be > 0, got {self.temperature}")
        if self.loss_reduction not in ("mean", "sum"):
            bad(f"--loss-reduction must be mean or sum, got {self.loss_reduction!r}")
        unknown = [t for t in self.train if t not in TRAINABLE_GROUPS]
        if unknown or not self.train:
            bad(f"--train takes a comma list of {', '.join(TRAINABLE_GROUPS)}; got {','.join(self.train) or 'nothing'}")
        if self.mixed_precision not in ("auto", "bf16", "fp16", "no"):
            bad(f"--mixed-precision must be auto, bf16, fp16 or no, got {self.mixed_precision!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            bad(f"--adam-betas takes two values in [0, 1), got {','.join(map(str, self.adam_betas))}")
        if self.image_aspect not in (None, "pad", "square"):
            bad(f"--image-aspect must be pad or square, got {self.image_aspect!r}")

    # --- serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_sources(cls, path: str | Path | None = None, **overrides) -> "DistillConfig":
        """Fields from a YAML/JSON file, then every override that is not None."""
        values: dict = {}
        if path is not None:
            values = read_recipe(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MatvlmError(f"{path}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def read_recipe(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MatvlmError(f"config file {p} does not exist")
    try:
        data = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise MatvlmError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if not isinstance(data, dict):
        raise MatvlmError(f"{p} must hold a mapping of setting: value, got {type(data).__name__}")
    return data
