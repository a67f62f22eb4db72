"""Which backend runs an op: mamba_ssm's Triton kernels or PyTorch for the Mamba-2 scan (`backend_for`),
matvlm's Triton decode kernels or PyTorch for the decode step (`decode_kernels`), and likewise for other
fused kernels (`fused_kernels`: the distillation loss's KL).

``MATVLM_KERNELS=torch|triton|auto`` (default ``auto``) forces a choice; asking for ``triton`` where it
cannot run is an error. The path taken is logged once. Code being traced by `torch.compile` always takes
the PyTorch path for the Mamba-2 scan (inductor fuses its element-wise work, which the opaque mamba_ssm
launchers would prevent).
"""

from __future__ import annotations

import importlib
import logging
import os

import torch
from torch import Tensor

from . import ssd_triton

log = logging.getLogger("matvlm.ops")
_announced: set[str] = set()


def _wanted() -> str:
    """MATVLM_KERNELS: 'auto', 'torch' or 'triton'."""
    want = os.environ.get("MATVLM_KERNELS", "auto").lower()
    if want not in ("auto", "torch", "triton"):
        raise ValueError(f"MATVLM_KERNELS must be auto, torch or triton, got {want!r}")
    return want


def backend_for(x: Tensor) -> str:
    """The backend a call on `x` will use: 'triton' or 'torch'."""
    if torch.compiler.is_compiling():
        return "torch"
    want = _wanted()
    if want == "torch":
        choice = "torch"
    else:
        kernels, why = ssd_triton.load() if x.is_cuda else (None, "tensor is on the CPU")
        if kernels is None and want == "triton":
            raise RuntimeError(f"MATVLM_KERNELS=triton but the Triton path is unavailable: {why}")
        choice = "triton" if kernels is not None else "torch"
        if choice == "torch" and x.is_cuda and "fallback" not in _announced:
            _announced.add("fallback")
            log.warning("Mamba-2 kernels: pure-PyTorch fallback on CUDA (%s); expect slow prefill", why)
    if choice not in _announced:
        _announced.add(choice)
        log.info("Mamba-2 kernels: %s", "mamba_ssm Triton" if choice == "triton" else "pure PyTorch")
    return choice


def decode_kernels(module: str, x: Tensor):
    """The decode-kernel module `matvlm.ops.<module>` (gemv_triton, attention_triton, mamba_decode_triton)
    when its kernels can run on `x` (CUDA, bf16/fp16, triton installed, not MATVLM_KERNELS=torch), else
    None; the caller then takes the kernel's PyTorch twin."""
    return fused_kernels(module, x, (torch.bfloat16, torch.float16))


def fused_kernels(module: str, x: Tensor, dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """The Triton kernel module `matvlm.ops.<module>` when it can run on `x` (CUDA, a dtype of `dtypes`,
    triton installed, not MATVLM_KERNELS=torch), else None."""
    if not x.is_cuda or x.dtype not in dtypes:
        return None
    if _wanted() == "torch":
        return None
    try:
        return importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return None


_dependent_launch: bool | None = None       # set_dependent_launch's override of MATVLM_PDL


def set_dependent_launch(on: bool | None) -> bool | None:
    """Turn programmatic dependent launch of the decode kernels on or off for kernels launched from now
    on (None: back to MATVLM_PDL); returns the setting it replaces. CUDA graphs captured before keep what
    they were captured with."""
    global _dependent_launch
    before, _dependent_launch = _dependent_launch, on
    return before


def dependent_launch_wanted() -> bool:
    """The PDL setting before the device has its say: set_dependent_launch's override, else MATVLM_PDL
    (``1``, the default, on; ``0`` off)."""
    if _dependent_launch is not None:
        return _dependent_launch
    want = os.environ.get("MATVLM_PDL", "1")
    if want not in ("0", "1"):
        raise ValueError(f"MATVLM_PDL must be 0 or 1, got {want!r}")
    return want == "1"


def dependent_launch(x: Tensor) -> bool:
    """Whether matvlm's decode kernels on `x` launch as programmatic dependent launches (PDL; Hopper and
    later, Triton with `griddepcontrol`). Each kernel may then start while the one before it in the stream
    finishes; it waits for that kernel to complete and flush (`griddepcontrol.wait`) before it reads or
    writes anything an earlier kernel may touch, and right after the wait lets the next kernel launch. The
    one-row matrix-vector kernel loads its first block of weights before waiting, so its weights must not
    be written by the kernel just before it (the engine's never are). This hides part of each launch's
    ramp-up and tail, which at batch 1 is a fixed cost per kernel. On by default where the device allows
    it; ``MATVLM_PDL=0`` turns it off. On an H100 it made the batch-1 step 2-5 % faster, and its greedy
    tokens differed from those without it only at near-ties of a full forward (scripts/pdl-equivalence.py;
    docs/benchmarks.md)."""
    on = dependent_launch_wanted()
    if not on or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    from . import pdl_triton
    return pdl_triton.AVAILABLE
