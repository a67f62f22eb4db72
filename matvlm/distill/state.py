"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

`checkpoints/step-N/` holds:
    trainable.safetensors   the trainable parameters (float32), by parameter name
    optimizer.safetensors   the optimizer's per-parameter tensors, keys "state.<i>.<name>"
    trainer_state.json      step, optimizer scalars and param groups, scheduler, RNG, config
Written with `model.io.atomic_dir`, so a checkpoint directory is either complete or absent.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import MatvlmError
from ..model.io import atomic_dir

STEP_DIR = re.compile(r"^step-(\d+)$")


def optimizer_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """optimizer.state_dict() -> (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, st in state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in rest["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    v, internal, gauss = rest["python"]
    random.setstate((v, tuple(internal), gauss))


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    extra: dict, keep_last: int | None = None) -> Path:
    # optimizer None: its state is sharded elsewhere (DeepSpeed ZeRO); the checkpoint then holds none
    opt_tensors, opt_rest = optimizer_to_flat(optimizer.state_dict()) if optimizer is not None else ({}, None)
    rng_tensors, rng_rest = rng_state()
    out = ckpt_root / f"step-{step}"
    with atomic_dir(out, overwrite=True) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file({f"rng.{k}": v for k, v in rng_tensors.items()}, str(tmp / "rng.safetensors"))
        state = {"step": step, "optimizer": opt_rest, "scheduler": scheduler.state_dict(), "rng": rng_rest, **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_jsonable))
    if keep_last:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"cannot store {type(x).__name__} in trainer_state.json")


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors, optimizer tensors, rng tensors, trainer_state) of one checkpoint directory."""
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        rng = {k.removeprefix("rng."): v for k, v in load_file(str(path / "rng.safetensors")).items()}
    except (OSError, ValueError) as e:
        raise MatvlmError(f"checkpoint {path} is incomplete or unreadable: {e}") from e
    return trainable, opt, rng, state
