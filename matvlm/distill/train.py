"""The distillation loop (paper §4.1) on accelerate: one process or many, CPU or GPU.

Exactness across process counts: a step's global batch is the same list of samples whatever the
number of processes (`BatchPlan`), every loss is a sum over real tokens divided by the number of
real tokens in the *global* batch (all-reduced before the backward passes), and gradients are
summed over micro-batches and processes. So 1 process with 4 micro-batches and 2 processes with 2
each give the same loss curve up to float rounding, and `--resume` continues bit-for-bit on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..errors import MatvlmError
from ..model.hybrid import decoder_layers
from . import losses
from . import state as ckpt
from .config import DistillConfig
from .model import DistillStep, build, require_right_padding

log = logging.getLogger("matvlm.distill")
CONFIG_NAME = "distill_config.json"
LOG_NAME = "log.jsonl"
SELF_GENERATED = "self-generated.jsonl"  # --self-generate writes the training data here
GROUP_STEPS = 32                         # --group-by-length: steps whose samples are sorted by length together
# On CUDA a micro-batch that needs padding is padded to a multiple of this many positions: torch's cuDNN
# attention (its pick on an H100, mostly faster than flash / memory-efficient attention at these shapes once
# built) builds a graph per new shape, 36-68 ms each (docs/benchmarks.md); so a run meets at most
# max_length / 32 padded lengths, built once each, for under 32 more pad positions a row (masked out of
# every loss). Micro-batches of equal lengths stay as they are (no mask: attention's causal path)
CUDA_PAD_MULTIPLE = 32


@dataclass
class BatchPlan:
    """Which samples each process sees at each step.

    Epoch e is a permutation of the data seeded by (seed, e); step s takes the next global batch of
    `global_batch` samples (a partial last batch is dropped); process r takes the r-th contiguous
    share of it, cut into micro-batches. With `lengths` (tokens per sample) a share is sorted by length,
    longest first, before it is cut, so each micro-batch pads to lengths close to its own: a step still
    sums the gradients of the same samples, with less padding computed. With `tokens` the sorted share is
    cut by positions instead of rows: each micro-batch takes rows while rows x its first (longest) row's
    length stays within `tokens` (a longer row goes alone), so the count of micro-batches varies by step.

    With `group` (steps) the samples are also grouped by length across steps, as length-grouped samplers
    do: each run of `group` steps of the epoch's permutation is sorted by length, cut into global batches,
    and those are taken in an order shuffled by (seed, epoch, run). Every epoch still sees every usable
    sample once; a step then holds samples of similar lengths, so its micro-batches pad far less.
    """

    n: int
    global_batch: int
    world: int
    micro: int
    seed: int
    lengths: list[int] | None = None
    group: int = 0                    # steps per length group (0: no grouping across steps)
    tokens: int = 0                   # positions per micro-batch (0: `micro` rows each)

    def __post_init__(self):
        if self.tokens and self.lengths is None:
            raise MatvlmError("--micro-batch-tokens needs the samples' lengths, which this dataset does not give")
        if self.tokens and self.global_batch % self.world:
            raise MatvlmError(f"--global-batch-size {self.global_batch} must be a multiple of the {self.world} "
                              f"process(es)")
        if not self.tokens and self.global_batch % (self.world * self.micro):
            raise MatvlmError(f"--global-batch-size {self.global_batch} must be a multiple of --micro-batch-size "
                              f"{self.micro} x {self.world} process(es)")
        if self.n < self.global_batch:
            raise MatvlmError(f"the data has {self.n} usable samples, fewer than one global batch of "
                              f"{self.global_batch}; lower --global-batch-size")

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.global_batch

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.world * self.micro)

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        gb = self.global_batch
        if not (self.group and self.lengths is not None):
            return perm[k * gb:(k + 1) * gb].tolist()
        first = k // self.group * self.group                                  # the run of steps holding k
        steps = min(self.group, self.steps_per_epoch - first)
        run = sorted(perm[first * gb:(first + steps) * gb].tolist(), key=lambda i: -self.lengths[i])
        g_order = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + first)
        j = int(torch.randperm(steps, generator=g_order)[k - first])
        return run[j * gb:(j + 1) * gb]

    def step_micro_batches(self, rank: int, step: int) -> list[list[int]]:
        """Process `rank`'s micro-batches of step `step`, in order."""
        share = self.global_batch // self.world
        mine = self.global_indices(step)[rank * share:(rank + 1) * share]
        if self.lengths is not None:
            mine = sorted(mine, key=lambda i: -self.lengths[i])           # stable: ties keep their order
        if not self.tokens:
            return [mine[j:j + self.micro] for j in range(0, share, self.micro)]
        cut: list[list[int]] = [[]]
        for i in mine:                                  # longest first: a micro-batch pads to its first row
            if cut[-1] and (len(cut[-1]) + 1) * self.lengths[cut[-1][0]] > self.tokens:
                cut.append([])
            cut[-1].append(i)
        return cut

    def micro_batches(self, rank: int, start: int, stop: int):
        for step in range(start, stop):
            yield from self.step_micro_batches(rank, step)


def wsd_lambda(total: int, warmup_ratio: float, decay_ratio: float):
    """Warmup-stable-decay: linear warmup over the first warmup_ratio of steps, flat, then linear decay
    towards 0 over the last decay_ratio."""
    w = max(1, round(warmup_ratio * total)) if warmup_ratio > 0 else 0
    d = max(1, round(decay_ratio * total)) if decay_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        if d and step >= total - d:
            return (total - step) / d
        return 1.0
    return factor


def align_steps(cfg: DistillConfig, total: int) -> int:
    """Optimizer steps of the align stage (the first ones of the run): all under stage "align", none under
    "e2e", `cfg.align_steps` (default a quarter of the run) under "both", always leaving one e2e step."""
    if cfg.stage == "align":
        return total
    if cfg.stage == "e2e":
        return 0
    n = cfg.align_steps if cfg.align_steps is not None else max(1, round(total / 4))
    if n >= total:
        raise MatvlmError(f"--align-steps {n} leaves no end-to-end step of the {total}; lower it or raise --max-steps")
    return n


def staged_lambda(cfg: DistillConfig, total: int):
    """The learning-rate factor per step: each stage its own warmup-stable-decay, the align stage's peak
    at align_lr (a factor of lr)."""
    n = align_steps(cfg, total)
    first = wsd_lambda(n, cfg.warmup_ratio, cfg.decay_ratio) if n else None
    second = wsd_lambda(total - n, cfg.warmup_ratio, cfg.decay_ratio) if n < total else None
    scale = (cfg.align_lr or cfg.lr) / cfg.lr
    return lambda step: scale * first(step) if step < n or second is None else second(step - n)


def loss_weights(cfg: DistillConfig, stage: str) -> tuple[float, float, float]:
    """(alpha, beta, gamma) of a stage: the align stage is L_layer alone."""
    return (1.0, 0.0, 0.0) if stage == "align" else (cfg.alpha, cfg.beta, cfg.gamma)


def param_groups(model: torch.nn.Module, names: list[str], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on 1-D parameters (biases, norms, dt_bias, A_log, D)."""
    params = dict(model.named_parameters())
    decay = [params[n] for n in names if params[n].ndim >= 2]
    no_decay = [params[n] for n in names if params[n].ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def enable_checkpointing(model) -> None:
    """Activation checkpointing of the decoder layers (transformers renamed the method in 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def make_dataset(cfg: DistillConfig, processor, model_config):
    from ..inputs.data import LlavaJsonDataset, TextJsonlDataset
    from ..inputs.templates import get_template, template_for, text_template

    if hasattr(model_config, "vision_config"):
        template = get_template(cfg.template) if cfg.template else template_for(model_config)
        aspect = cfg.image_aspect or getattr(model_config, "image_aspect_ratio", None) or "square"
        aspect = aspect if aspect in ("pad", "square") else "square"
        return LlavaJsonDataset(cfg.data, cfg.image_root or Path(cfg.data).parent, processor, template,
                                cfg.max_length, image_aspect=aspect, strict=cfg.strict)
    return TextJsonlDataset(cfg.data, processor, text_template(processor, model_config, cfg.template), cfg.max_length)


def remove_leftovers(out: Path) -> list[Path]:
    """Delete what an interrupted run leaves behind (a process killed while it wrote a checkpoint or the
    final model): `checkpoints/.step-N.tmp-*` / `.old-*` and `.final-*` staging directories. Complete
    checkpoints are renamed into place atomically, so nothing here is ever needed again. Returns them."""
    found = [p for p in (out / "checkpoints").glob(".step-*") if re.match(r"^\.step-\d+\.(tmp|old)-", p.name)]
    found += [p for p in out.glob(".final-*")] if out.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return found


def check_inputs(cfg: DistillConfig) -> None:
    """The cheap checks of a run's inputs: model directories that exist and are of a known layout, a data
    file that reads and holds entries, an image root that is a directory."""
    from ..convert.formats import detect_format
    from ..inputs.data import read_records

    detect_format(cfg.teacher)
    if cfg.student:
        detect_format(cfg.student)
    if not read_records(cfg.data):
        raise MatvlmError(f"{cfg.data}: the data file holds no entries")
    if cfg.image_root and not Path(cfg.image_root).is_dir():
        raise MatvlmError(f"--image-root {cfg.image_root}: no such directory")


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / CONFIG_NAME).is_file():
            raise MatvlmError(f"--resume {out}: no {CONFIG_NAME} there; it is not a distillation output directory")
        return
    own = {SELF_GENERATED + suffix for suffix in ("", ".partial", ".meta.json")} | {f".{SELF_GENERATED}.tmp",
                                                                                  "placement"}   # --placement auto
    if out.exists() and any(p.name not in own for p in out.iterdir()):
        raise MatvlmError(f"output directory {out} is not empty; pass --resume {out} to continue that run, "
                          "or choose another --out")


class _Loggers:
    """log.jsonl always; TensorBoard and wandb when asked for and installed."""

    def __init__(self, out: Path, cfg: DistillConfig, active: bool):
        self.active, self.path, self.tb, self.wandb = active, out / LOG_NAME, None, None
        if not active:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                log.info("tensorboard is not installed; logging to %s only", self.path)
        if cfg.wandb:
            try:
                import wandb
            except ImportError as e:
                raise MatvlmError("--wandb needs the wandb package (pip install wandb)") from e
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "matvlm"), config=cfg.to_dict(),
                                    dir=str(out), name=out.name)

    def truncate_after(self, step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be redone)."""
        if not self.active or not self.path.is_file():
            return
        from ..model.io import atomic_write_text

        keep = []
        for line in self.path.read_text().split("\n"):
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):   # a line the interrupted run did not finish
                continue
        atomic_write_text(self.path, "".join(l + "\n" for l in keep))

    def write(self, rec: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"distill/{k}", v, rec["step"])
        if self.wandb:
            self.wandb.log(rec, step=rec["step"])

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _mean_mode_loss(o: dict, w: tuple[float, float, float], n_tok: torch.Tensor, n_ans: torch.Tensor) -> torch.Tensor:
    alpha, beta, gamma = w
    loss = (alpha * o["layer_sum"] + beta * o["prob_sum"]) / n_tok
    if gamma:
        loss = loss + gamma * o["ce_sum"] / n_ans.clamp_min(1)
    return loss


def _sum_mode_loss(o: dict, w: tuple[float, float, float], batch_size: int) -> torch.Tensor:
    """MaTVLM's micro-batch loss: Frobenius layer norms, KL 'batchmean', mean CE."""
    alpha, beta, gamma = w
    loss = alpha * o["layer_sq"].clamp_min(0).sqrt().sum() + beta * o["prob_sum"] / batch_size
    if gamma:
        loss = loss + gamma * o["ce_sum"] / o["n_answer"].clamp_min(1)
    return loss


def run(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Distil `cfg.student` (or a fresh conversion) from `cfg.teacher`; returns the output directory.

    The recipe: `setup` (processes, inputs checked, model, data, optimizer) -> `resume_from` (the newest
    checkpoint's weights, optimizer, schedule and RNG) -> `prepare` (the step module under accelerate) ->
    `train_step` per optimizer step, checkpoints every `save_every` -> `save_final`."""
    from tqdm.auto import tqdm

    r = setup(cfg, resume)
    start = resume_from(r) if resume else 0
    if start >= r.total:
        raise MatvlmError(f"the run in {r.out} already reached step {start} of {r.total}; raise --max-steps to go on")
    prepare(r)
    steps = r.steps(start)
    bar = tqdm(total=r.total, initial=start, disable=not (r.main and progress), desc="distill", unit="step",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30)   # logs: a line per 30 s
    if r.accelerator.device.type == "cuda":   # the first step waited 106 s on a fresh H100 with nothing said
        bar.set_postfix_str("the first step compiles and autotunes the GPU kernels" +
                            (" and torch.compile's graphs" if cfg.compile else "") +
                            " (a minute or two the first time; compiled kernels are cached on disk)")
    pending = None              # the step issued last, whose record is read once the next one is queued

    def finish(issued: dict) -> None:
        nonlocal pending
        try:
            _log_step(r, bar, finish_step(r, issued))
        except MatvlmError:                # non-finite: the step issued after it is not logged either
            pending = None
            raise

    try:
        for step in range(start, r.total):
            t = time.perf_counter()
            micro = next(steps)
            waited = time.perf_counter() - t        # on the data loader, while the GPU works off its queue
            issued = train_step(r, step, micro)
            issued["data_s"] = waited
            done, pending = pending, issued
            if done is not None:
                finish(done)
            if (step + 1) % cfg.save_every == 0 or step + 1 == r.total:
                done, pending = pending, None                       # never a checkpoint of a non-finite step
                finish(done)
                save_checkpoint(r, step + 1)
    finally:
        try:
            if pending is not None:        # interrupted: the last issued step still gets its log line
                _log_step(r, bar, finish_step(r, pending))
        except Exception:                  # noqa: BLE001 (the error that interrupted the run is the one to see)
            pass
        bar.close()
        r.loggers.close()
    with r.full_params():
        if r.main:
            save_final(r.accelerator.unwrap_model(r.step_module).model, r.out, r.processor, r.frozen_dtype, cfg)
    r.accelerator.wait_for_everyone()
    return r.out


def loop_collate(device: torch.device, pad_token_id: int):
    """The loop's collate: on CUDA, padded micro-batches are padded to a multiple of CUDA_PAD_MULTIPLE."""
    from ..inputs.data import collate

    return partial(collate, pad_token_id=pad_token_id, multiple_of=CUDA_PAD_MULTIPLE if device.type == "cuda" else 1)


@dataclass
class Run:
    """Everything one distillation run holds, from `setup` to `save_final`."""

    cfg: DistillConfig
    out: Path
    accelerator: object
    mp: str                                 # mixed precision: bf16, fp16 or no
    fsdp: bool
    deepspeed: bool
    frozen_dtype: torch.dtype
    model: torch.nn.Module
    teacher: object
    trainable_names: list[str]
    processor: object
    dataset: object
    plan: BatchPlan
    total: int                              # optimizer steps
    n_align: int                            # the first n_align of them are align-stage steps
    optimizer: object
    scheduler: object
    loggers: "_Loggers"
    step_module: object = None              # set by `prepare`: the DistillStep as accelerate wraps it
    inner: DistillStep | None = None        # the DistillStep itself (which losses the stage needs)
    params: list | None = None              # the trainable parameters, as the prepared module holds them
    tokens_done: int = 0
    t0: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def steps(self, start: int):
        """This process's micro-batches of each step from step `start` on: a list per step (as many as the plan
        cut it into), loaded in order."""
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        plan = [self.plan.step_micro_batches(self.accelerator.process_index, s) for s in range(start, self.total)]
        loaded = iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=[mb for step in plan for mb in step],
            collate_fn=loop_collate(self.accelerator.device, tokenizer.pad_token_id), num_workers=self.cfg.num_workers,
            pin_memory=self.accelerator.device.type == "cuda"))
        for step in plan:
            yield [next(loaded) for _ in step]

    def full_params(self):
        """Outside forward/backward FSDP holds each rank's shard only; saving needs the whole tensors
        (every process must enter)."""
        if not self.fsdp:
            return nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.step_module, writeback=False)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        if not self.deepspeed:
            self.accelerator.backward(loss)
            return
        # DeepSpeed's engine: mark the accumulation boundary ourselves (accelerate would mark every
        # micro-batch as one, stepping the optimizer on partial gradients) and step only there; its
        # backward scales by 1/accumulation, which matvlm's normalisation already did
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=last)
        engine.backward(loss * self.plan.accumulation)
        if last:
            engine.step()

    def autocast(self):
        """accelerate's autocast, which it turns off under DeepSpeed (DeepSpeed casts the module to bf16
        instead); matvlm autocasts there too, so that norms, softmax and the SSM's element-wise work
        run in float32 as in single-process and DDP runs."""
        if self.deepspeed and torch.cuda.is_available() and self.mp in ("bf16", "fp16"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if self.mp == "bf16" else torch.float16)
        return self.accelerator.autocast()


def setup(cfg: DistillConfig, resume: bool) -> Run:
    """Processes, leftovers of an interrupted run removed, inputs checked (before the model loads, which
    can take a minute), model and teacher view, data, batch plan, optimizer, schedule, loggers; the run's
    config is written once the model and the data are known to load."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from ..convert import formats

    cfg.validate()
    out = Path(cfg.out)
    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
    accelerator = Accelerator(mixed_precision=mp, cpu=not cuda,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    if main and out.is_dir():
        for p in remove_leftovers(out):
            log.info("removed %s, left by an interrupted run", p)
    accelerator.wait_for_everyone()
    _check_out_dir(out, resume)
    check_inputs(cfg)
    accelerator.wait_for_everyone()  # every process checks before the main one writes there

    frozen_dtype = torch.bfloat16 if mp == "bf16" else (torch.float16 if mp == "fp16" else torch.float32)
    fsdp = getattr(accelerator.state, "fsdp_plugin", None) is not None
    if fsdp:
        # FSDP flattens frozen and trainable parameters together, which needs one dtype: keep all in
        # float32 and let its mixed-precision policy compute in bf16 (more memory, the sharding pays it)
        frozen_dtype = torch.float32
    if cfg.compile and (fsdp or getattr(accelerator.state, "deepspeed_plugin", None) is not None):
        raise MatvlmError("--compile is not supported with FSDP or DeepSpeed; run without it")
    if cfg.micro_batch_tokens and (fsdp or getattr(accelerator.state, "deepspeed_plugin", None) is not None):
        # FSDP gathers in every forward (processes must run as many) and DeepSpeed fixes the accumulation count
        raise MatvlmError("--micro-batch-tokens is not supported with FSDP or DeepSpeed; use --micro-batch-size")
    model, teacher, trainable_names = build(cfg.teacher, cfg.student, cfg.mamba_ratio, cfg.placement, cfg.train,
                                            dtype=frozen_dtype, seed=cfg.seed)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    processor = formats.load_processor(cfg.teacher)
    dataset = make_dataset(cfg, processor, model.config)
    plan = BatchPlan(len(dataset), cfg.global_batch_size, accelerator.num_processes, cfg.micro_batch_size, cfg.seed,
                     getattr(dataset, "lengths", None) or None, group=GROUP_STEPS if cfg.group_by_length else 0,
                     tokens=cfg.micro_batch_tokens or 0)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * plan.steps_per_epoch))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            (out / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=1))
    accelerator.wait_for_everyone()
    optimizer = torch.optim.AdamW(param_groups(model, trainable_names, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, staged_lambda(cfg, total))
    return Run(cfg=cfg, out=out, accelerator=accelerator, mp=mp, fsdp=fsdp,
               deepspeed=getattr(accelerator.state, "deepspeed_plugin", None) is not None, frozen_dtype=frozen_dtype,
               model=model, teacher=teacher, trainable_names=trainable_names, processor=processor, dataset=dataset,
               plan=plan, total=total, n_align=align_steps(cfg, total), optimizer=optimizer, scheduler=scheduler,
               loggers=_Loggers(out, cfg, main))


def resume_from(r: Run) -> int:
    """Load the newest checkpoint of `r.out` (trainable weights, optimizer, schedule, RNG) and drop log
    lines after it; returns the step to continue from (0 when the run stopped before its first one)."""
    found = ckpt.list_checkpoints(r.out / "checkpoints")
    if not found:                 # stopped before its first checkpoint: nothing to continue, start over
        log.info("%s has no checkpoint yet; starting the run from step 0", r.out)
        r.loggers.truncate_after(0)
        return 0
    weights, opt_t, rng_t, st = ckpt.load_checkpoint(found[-1])
    if st["optimizer"] is None:
        raise MatvlmError(f"checkpoint {found[-1]} was written under DeepSpeed ZeRO or FSDP, which shard the "
                          "optimizer state; matvlm cannot resume it exactly (resume works for single-process "
                          "and DDP runs)")
    params = dict(r.model.named_parameters())
    missing = set(r.trainable_names) - set(weights)
    if missing:
        raise MatvlmError(f"checkpoint {found[-1]} lacks trainable tensors (e.g. {sorted(missing)[0]}); "
                          "was it written with other --train groups?")
    with torch.no_grad():
        for n in r.trainable_names:
            params[n].copy_(weights[n])
    r.optimizer.load_state_dict(ckpt.optimizer_from_flat(opt_t, st["optimizer"]))
    r.scheduler.load_state_dict(st["scheduler"])
    ckpt.set_rng_state(rng_t, st["rng"])
    r.loggers.truncate_after(st["step"])
    log.info("resuming from %s at step %d", found[-1], st["step"])
    return st["step"]


def prepare(r: Run) -> None:
    """The step module (teacher pass, student pass, losses) and the optimizer under accelerate; DeepSpeed
    is told matvlm's micro-batch, accumulation and clipping (its engine steps the optimizer itself)."""
    module = DistillStep(r.model, r.teacher, r.cfg.temperature, need_ce=False, need_layer=False, need_prob=False)
    if r.cfg.compile:                             # (setup refused it under FSDP and DeepSpeed)
        compile_layers(r.model)
    if r.deepspeed:
        dsc = r.accelerator.state.deepspeed_plugin.deepspeed_config
        dsc.update(train_micro_batch_size_per_gpu=r.cfg.micro_batch_size, gradient_accumulation_steps=r.plan.accumulation,
                   train_batch_size=r.cfg.global_batch_size, gradient_clipping=r.cfg.max_grad_norm)
    r.step_module, r.optimizer = r.accelerator.prepare(module, r.optimizer)
    r.inner = module
    names = set(r.trainable_names)
    r.params = [p for n, p in r.accelerator.unwrap_model(r.step_module).model.named_parameters() if n in names]
    r.t0 = time.time()


def compile_layers(model) -> int:
    """`distill --compile`: each attention layer as one compiled region (norms, attention, residuals and MLP in
    one graph; the layers share it, as their code and shapes are the same); in a Mamba layer only the norms
    and the MLP, and the mixer runs as it is (its scan is Triton kernels or the reference's chunk loop, and
    the teacher's attention is swapped into that slot for the teacher pass). Lengths vary, so shapes are
    dynamic. Returns the number of compiled modules."""
    from ..model.mixer import Mamba2Mixer

    n = 0
    for layer in decoder_layers(model):
        if not isinstance(layer.self_attn, Mamba2Mixer):
            layer.compile(dynamic=True)
            n += 1
            continue
        for child in layer.children():
            if not isinstance(child, Mamba2Mixer) and next(child.parameters(), None) is not None:
                child.compile(dynamic=True)
                n += 1
    return n


BATCH_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


def train_step(r: Run, step: int, micro: list[dict]) -> dict:
    """One optimizer step over this process's micro-batches: token counts all-reduced first (every loss is
    normalised by the global batch's), forward and backward per micro-batch (gradients synchronised on the
    last), clipping, optimizer and schedule. The step's losses, gradient norm and token count stay on the
    device: `finish_step` reads them (and stops a non-finite run) once the next step's first work is
    queued; nothing inside a text model's step waits for the device (see `model.causal_attention`)."""
    cfg, acc = r.cfg, r.accelerator
    stage = "align" if step < r.n_align else "e2e"
    w = loss_weights(cfg, stage)
    need_logits = w[1] > 0 or w[2] > 0         # the align stage runs no LM head and no student stack
    r.inner.need_ce, r.inner.need_layer, r.inner.need_prob = need_logits, w[0] > 0, w[1] > 0
    counts = torch.tensor([[float(b["attention_mask"].sum()),
                            float(((b["labels"][:, 1:] != -100) & (b["attention_mask"][:, :-1] > 0)).sum())]
                           for b in micro]).sum(0).to(acc.device)
    n_tok, n_ans = acc.reduce(counts, "sum")
    sums = torch.zeros(4, device=acc.device)      # loss, layer, prob, ce (for logging)
    r.step_module.train()
    for j, b in enumerate(micro):
        # pinned batches copy without waiting for the device (a pageable copy waits for the queued work);
        # the real tokens' rows are found here on the host, not by a nonzero() that waits for the device
        require_right_padding(b["attention_mask"])              # on the host, before the copy
        rows = losses.real_rows(b["attention_mask"])
        b = {k: b[k].to(acc.device, non_blocking=True) for k in BATCH_KEYS if b.get(k) is not None}
        b["rows"] = rows.pin_memory().to(acc.device, non_blocking=True) if acc.device.type == "cuda" else rows
        last = j == len(micro) - 1
        with acc.no_sync(r.step_module) if not last else nullcontext(), r.autocast():
            o = r.step_module(**b)
            if cfg.loss_reduction == "mean":
                loss = _mean_mode_loss(o, w, n_tok, n_ans)
                r.backward(loss * r.world, last)       # DDP averages over processes
                sums += torch.stack([loss.detach(), o["layer_sum"].detach() / n_tok,
                                     o["prob_sum"].detach() / n_tok, o["ce_sum"].detach() / n_ans.clamp_min(1)])
            else:
                loss = _sum_mode_loss(o, w, b["input_ids"].shape[0])
                r.backward(loss, last)
                n_mb = len(micro) * r.world
                sums += torch.stack([loss.detach(), o["layer_sq"].detach().clamp_min(0).sqrt().sum(),
                                     o["prob_sum"].detach() / b["input_ids"].shape[0],
                                     o["ce_sum"].detach() / o["n_answer"].clamp_min(1)]) / n_mb
    sums = acc.reduce(sums, "sum")
    grad_norm = acc.clip_grad_norm_(r.params, cfg.max_grad_norm)  # DeepSpeed: the norm it clipped
    lr = r.scheduler.get_last_lr()[0]
    r.optimizer.step()
    r.scheduler.step()
    r.optimizer.zero_grad(set_to_none=True)
    return {"step": step + 1, "stage": stage, "weights": w, "lr": lr, "sums": sums, "grad_norm": grad_norm,
            "n_tok": n_tok}


def finish_step(r: Run, issued: dict) -> dict:
    """The log record of a step `train_step` issued (this waits for the device to finish it). A non-finite
    loss or gradient norm stops the run, before any checkpoint of that step or a later one is written."""
    w, sums, grad_norm = issued["weights"], issued["sums"].tolist(), issued["grad_norm"]
    grad_norm = float("nan") if grad_norm is None else float(grad_norm)
    if not math.isfinite(sums[0]) or (not math.isfinite(grad_norm) and not r.deepspeed):
        last_ok = ckpt.list_checkpoints(r.out / "checkpoints")
        raise MatvlmError(f"non-finite loss ({sums[0]}) or gradient norm ({grad_norm}) at step "
                          f"{issued['step']}; stopped. Last good checkpoint: {last_ok[-1] if last_ok else 'none'}")
    n_tok = int(issued["n_tok"])
    r.tokens_done += n_tok
    elapsed = time.time() - r.t0
    return {"step": issued["step"], "stage": issued["stage"], "loss": sums[0],
            "loss_layer": sums[1] if w[0] > 0 else None, "loss_prob": sums[2] if w[1] > 0 else None,
            "loss_ce": sums[3] if w[1] > 0 or w[2] > 0 else None, "lr": issued["lr"], "grad_norm": grad_norm,
            "tokens": n_tok, "tokens_per_s": r.tokens_done / max(elapsed, 1e-9), "elapsed_s": elapsed,
            "data_s": issued["data_s"]}


def _log_step(r: Run, bar, rec: dict) -> None:
    r.loggers.write(rec)
    bar.update(1)
    bar.set_postfix({k: f"{rec[k]:.4g}" for k in ("loss", "loss_layer", "loss_prob", "lr", "tokens_per_s")
                     if rec[k] is not None})


def save_checkpoint(r: Run, step: int) -> None:
    """Checkpoint `step` (every process enters; the main one writes): trainable weights, and, where this
    process holds it whole (not under ZeRO or FSDP), the optimizer state, schedule and RNG."""
    with r.full_params():
        if r.main:
            names = set(r.trainable_names)
            trained = {n: p for n, p in r.accelerator.unwrap_model(r.step_module).model.named_parameters() if n in names}
            opt = None if r.deepspeed or r.fsdp else getattr(r.optimizer, "optimizer", r.optimizer)
            ckpt.save_checkpoint(r.out / "checkpoints", step, trained, opt, r.scheduler,
                                 {"total_steps": r.total, "config": r.cfg.to_dict()}, r.cfg.keep_last)
    r.accelerator.wait_for_everyone()


def save_final(model: torch.nn.Module, out: Path, processor, dtype: torch.dtype, cfg: DistillConfig) -> None:
    """Write the trained hybrid at the top level of `out`: files are staged in a temporary directory and
    moved in one by one, config.json last, so a reader never sees a config without its weights."""
    import shutil
    import uuid

    from ..model.io import save_hybrid

    stage = out / f".final-{uuid.uuid4().hex[:8]}"
    trained = {id(p): p.data for p in model.parameters() if p.requires_grad}
    try:
        for p in model.parameters():                     # store one dtype, the teacher's
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)
        model.hybrid_config.source.update({"distilled_from": str(cfg.teacher), "distill_out": str(out)})
        save_hybrid(model, stage, src_dir=cfg.teacher, processor=processor)
        names = sorted(os.listdir(stage), key=lambda n: n == "config.json")
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        for p in model.parameters():
            if id(p) in trained:
                p.data = trained[id(p)]
        shutil.rmtree(stage, ignore_errors=True)
