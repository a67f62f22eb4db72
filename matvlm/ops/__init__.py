"""Mamba-2 kernels and the decode step's kernels behind one dispatch point.

Model code calls `ssd`, `ssd_step`, `gated_rmsnorm` and `mamba_step` from here and nothing else; the
engine's fused decode step calls `linear`, `attend` (`rope_kv` and `decode_attention` in one) and
`mamba_step`. Each picks a backend per call (`backend`: ``MATVLM_KERNELS=torch|triton|auto``):

- the Mamba-2 scan (`scan`): mamba_ssm's Triton kernels (`ssd_triton`, CUDA tensors, mamba_ssm
  installed) or the pure-PyTorch reference (`ssd_ref`, any device);
- the decode step, by kernel family, each Triton module beside the module holding its PyTorch twin
  (`*_ref`): `gemv` / `gemv_triton` (`linear`), `attention` / `attention_triton` (`rope_kv`,
  `decode_attention`, `attend`), `mamba_decode` / `mamba_decode_triton` (`mamba_step`). The `*_triton`
  modules import triton at the top, so they are imported only where it is installed and the kernels
  can run; the twins are what they are tested against;
- the distillation loss's LM-head KL and its gradient: `kl` / `kl_triton` (`kl_and_grad`);
- the Mamba-2 mixer's causal convolution over a sequence: `conv` / `conv_triton` (`causal_conv1d`).

Code being traced by `torch.compile` (the engine's compiled decode step) always takes the PyTorch path
for the Mamba-2 ops; the decode kernels are registered as custom ops, which a compiled graph calls as
they are.
"""

from __future__ import annotations

from . import ssd_ref
from .attention import (DECODE_ATTENTION_MAX_KEYS, attend, decode_attention, mask_bias, rope_kv,
                        split_kv_applies)
from .backend import backend_for
from .conv import causal_conv1d
from .gemv import NormSpec, linear
from .kl import kl_and_grad
from .mamba_decode import mamba_step
from .scan import TORCH_CHUNK, TRITON_CHUNK, gated_rmsnorm, ssd, ssd_step

__all__ = ["causal_conv1d", "kl_and_grad", "ssd", "ssd_step", "gated_rmsnorm", "backend_for", "ssd_ref", "linear", "rope_kv", "decode_attention",
           "attend", "split_kv_applies", "mask_bias", "mamba_step", "NormSpec", "DECODE_ATTENTION_MAX_KEYS",
           "TORCH_CHUNK", "TRITON_CHUNK"]
