"""The Triton fast path: mamba_ssm's Triton kernels, imported without its CUDA extension.

mamba_ssm 2.3.2's package `__init__` imports the compiled `selective_scan_cuda`
(and `causal_conv1d`), which a `MAMBA_SKIP_CUDA_BUILD=TRUE` install does not have,
although the Triton kernels we use (`ops/triton/ssd_combined.py`,
`selective_state_update.py`, `layernorm_gated.py`) never need it. We therefore
register a bare package object for `mamba_ssm` whose search path is the installed
package directory, so that importing those submodules does not run `__init__`.

Only these entry points are used, never `mamba_split_conv1d_scan_combined` /
`use_mem_eff_path`, which need causal_conv1d.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def load() -> tuple[types.SimpleNamespace | None, str]:
    """Import the Triton kernels. Returns (namespace of functions or None, reason)."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    try:
        import triton  # noqa: F401
    except ImportError:
        return None, "triton is not installed"
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or not spec.submodule_search_locations:
        return None, "mamba_ssm is not installed (see README: GPU fast path)"
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        sys.modules["mamba_ssm"] = pkg
    try:
        combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        norm = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
    except Exception as e:  # a broken install must not break the CPU fallback
        return None, f"mamba_ssm Triton kernels failed to import: {type(e).__name__}: {e}"
    return types.SimpleNamespace(
        chunk_scan=combined.mamba_chunk_scan_combined,
        state_update=update.selective_state_update,
        rmsnorm=norm.rmsnorm_fn,
    ), "mamba_ssm Triton kernels"


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
        initial_state: Tensor | None, chunk_size: int) -> tuple[Tensor, Tensor]:
    k, _ = load()
    y, final = k.chunk_scan(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                            return_final_states=True)
    return y, final.float()


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None) -> Tensor:
    k, _ = load()
    h, p = x.shape[1], x.shape[2]
    n = state.shape[-1]
    # The kernel takes per-(head, channel) dt / A / D; stride-0 views make it use
    # one value per head (its `tie_hdim` fast path needs dt_bias given, so pass zeros).
    dt_e = dt[:, :, None].expand(-1, -1, p)                       # (B, H, P)
    A_e = A[:, None, None].expand(h, p, n)                        # (H, P, N)
    D_e = D[:, None].expand(h, p) if D is not None else None      # (H, P)
    bias_e = torch.zeros((), device=x.device, dtype=dt.dtype).expand(h, p)
    return k.state_update(state, x, dt_e, A_e, B, C, D=D_e, dt_bias=bias_e, dt_softplus=False)


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    k, _ = load()
    return k.rmsnorm(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
