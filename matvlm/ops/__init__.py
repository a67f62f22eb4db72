"""Mamba-2 kernels and the decode step's kernels behind one dispatch point.

Model code calls `ssd`, `ssd_step`, `gated_rmsnorm` and `mamba_step` from here and nothing else; the
engine's fused decode step calls `linear`, `attend` (`rope_kv` and `decode_attention` in one) and
`mamba_step`. Each picks a backend per call:

- ``triton``: mamba_ssm's Triton kernels (CUDA tensors, mamba_ssm installed);
- ``torch``: the pure-PyTorch reference in `ssd_ref` (any device).

``MATVLM_KERNELS=torch|triton|auto`` (default ``auto``) forces a choice; asking for
``triton`` where it cannot run is an error. The path taken is logged once.

Code being traced by `torch.compile` (the engine's compiled decode step) always takes the
PyTorch path for the Mamba-2 ops: inductor fuses their element-wise work into its own kernels,
which the opaque mamba_ssm launchers would prevent. The decode step's kernels (`triton_decode`)
are registered as custom ops, which a compiled graph would call as they are.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ssd_ref, triton_ssd

log = logging.getLogger("matvlm.ops")
_announced: set[str] = set()

TORCH_CHUNK = 64     # the reference's chunk: small chunks keep its (Q x Q) blocks cheap on CPU
TRITON_CHUNK = 256   # mamba_ssm's Mamba2 default chunk size


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
        kernels, why = triton_ssd.load() if x.is_cuda else (None, "tensor is on the CPU")
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


def ssd(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
        initial_state: Tensor | None = None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Mamba-2 scan over a sequence.

    Args:
        x: (B, T, H, P); dt: (B, T, H) positive (softplus already applied); A: (H,) negative;
        B, C: (B, T, G, N) with G dividing H; D: (H,) or None;
        initial_state: (B, H, P, N) or None (zeros).
    Returns:
        y: (B, T, H, P) in x's dtype; final_state: (B, H, P, N) float32 (float64 for float64 input).
    """
    if backend_for(x) == "triton":
        return triton_ssd.ssd(x, dt, A, B, C, D, initial_state, chunk_size or TRITON_CHUNK)
    return ssd_ref.ssd_chunked(x, dt, A, B, C, D, initial_state, chunk_size or TORCH_CHUNK)


def ssd_step(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
             D: Tensor | None = None) -> Tensor:
    """One decode step. state: (B, H, P, N), updated in place; x: (B, H, P); dt: (B, H);
    A: (H,); B, C: (B, G, N); D: (H,). Returns y: (B, H, P)."""
    if backend_for(x) == "triton":
        return triton_ssd.ssd_step(state, x, dt, A, B, C, D)
    return ssd_ref.ssd_step(state, x, dt, A, B, C, D)


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm(x · silu(z)) over channel groups of `group_size`, times weight. x, z: (..., D)."""
    if backend_for(x) == "triton":
        return triton_ssd.gated_rmsnorm(x, z, weight, eps, group_size)
    return ssd_ref.gated_rmsnorm_ref(x, z, weight, eps, group_size)


def _decode_kernels(x: Tensor):
    """The `triton_decode` module when its kernels can run on `x` (CUDA, bf16/fp16, triton installed,
    not MATVLM_KERNELS=torch), else None."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if _wanted() == "torch":
        return None
    try:
        from . import triton_decode
    except ImportError:
        return None
    return triton_decode


NormSpec = tuple  # (kind "layer" | "rms", weight, bias or None, eps)
DECODE_ATTENTION_MAX_KEYS = 8192


def linear(x: Tensor | None, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None, *,
           norm: NormSpec | None = None, tail: Tensor | None = None, act: str | None = None,
           out_act: str | None = None, out_act_from: int = 0) -> Tensor:
    """[norm(x) | act(tail)] @ weight.T (+ bias), out_act on its output features from `out_act_from`
    on, (+ residual): a decode step's product with the norm before it, the activations on either side
    and the residual add folded in.

    x: (B, K1) or None; norm: ("layer", weight, bias, eps) as `nn.LayerNorm`, ("rms", weight, None, eps)
    as transformers' RMSNorm, or None; tail: (B, K - K1) or None; act: None, "gelu_tanh", "gelu", or
    "silu_mul" (tail is (B, 2 (K - K1)): silu of its first half times its second half); out_act: None,
    "gelu_tanh" or "gelu"; weight: (N, K).
    On CUDA, for one row, one Triton kernel (`triton_decode.gemv`); otherwise PyTorch (for 8 rows
    cuBLAS after a separate norm / activation beat the kernel's 16-row variant on an H100:
    docs/benchmarks.md)."""
    if out_act not in (None, "gelu_tanh", "gelu"):
        raise ValueError(f"out_act must be None, 'gelu_tanh' or 'gelu', got {out_act!r}")
    src = x if x is not None else tail
    kernels = _decode_kernels(src)
    if (kernels is not None and src.dim() == 2 and src.shape[0] == 1 and weight.dtype == src.dtype
            and weight.stride(-1) == 1 and all(t is None or t.stride(-1) == 1 for t in (x, tail))):
        kind, nw, nb, eps = norm if norm is not None else (None, None, None, 1e-5)
        return kernels.gemv(x, weight, bias, residual.contiguous() if residual is not None else None, tail, nw, nb,
                            float(eps), kernels.NORMS[kind], kernels.ACTS[act], kernels.ACTS[out_act], out_act_from)
    parts = []
    if x is not None:
        parts.append(_norm(x, norm) if norm is not None else x)
    if tail is not None:
        parts.append(_activation(tail, act))
    y = F.linear(torch.cat(parts, -1) if len(parts) > 1 else parts[0], weight, bias)
    if out_act is not None:
        y = torch.cat([y[:, :out_act_from], _activation(y[:, out_act_from:], out_act)], -1)
    return y + residual if residual is not None else y


def _norm(x: Tensor, spec: NormSpec) -> Tensor:
    kind, weight, bias, eps = spec
    if kind == "layer":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x.float()                                         # as transformers' Llama/Qwen2/Mistral RMSNorm
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _activation(t: Tensor, act: str | None) -> Tensor:
    if act is None:
        return t
    if act == "gelu_tanh":
        return F.gelu(t, approximate="tanh")
    if act == "gelu":
        return F.gelu(t)
    if act == "silu_mul":
        gate, up = t.chunk(2, dim=-1)
        return F.silu(gate) * up
    raise ValueError(f"unknown activation {act!r}")


def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slot: Tensor, heads: int) -> Tensor:
    """A decode step's queries, keys and values from their projection qkv (B, (H + 2 KV) D): the rotary
    embedding (rotate-half convention; cos, sin: (B, R)) on the first R channels of every query and
    key head, keys and values written into the cache buffers (B, KV, L, D) at `slot`. Returns the
    queries (B, H, D)."""
    kernels = _decode_kernels(qkv)
    if kernels is not None and qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1:
        return kernels.rope_kv(qkv, cos, sin, keys, values, slot, heads)
    b, kv, d = qkv.shape[0], keys.shape[1], keys.shape[3]
    q = _rotate(qkv[:, :heads * d].reshape(b, heads, d), cos, sin)
    k = _rotate(qkv[:, heads * d:(heads + kv) * d].reshape(b, kv, d), cos, sin)
    v = qkv[:, (heads + kv) * d:].reshape(b, kv, d)
    keys.index_copy_(2, slot.view(1), k[:, :, None].to(keys.dtype))
    values.index_copy_(2, slot.view(1), v[:, :, None].to(values.dtype))
    return q


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, D) with its first R channels rotated: x cos + rotate_half(x) sin; cos, sin (B, R)."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    turned = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rot = rot * cos[:, None] + turned * sin[:, None]
    return torch.cat([rot, rest], dim=-1) if rest.shape[-1] else rot


def mask_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive (B, 1, 1, L) form of a (B, L) bool key mask (0 where True, -inf where False), for
    `decode_attention`'s sdpa path: made once per decode step instead of by sdpa in every layer (with a
    bool mask sdpa converted it per call: 4.6 us per layer at 16 K positions on an H100)."""
    return torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)[:, None, None]


def split_kv_applies(batch: int, heads: int, kv_heads: int, length: int) -> bool:
    """Whether one-query attention over a (batch, kv_heads, length) buffer goes to the split-KV Triton
    kernel rather than sdpa: one sequence, at most `DECODE_ATTENTION_MAX_KEYS` positions, and one KV
    head per query head. On an H100 the kernel (with rotary folded in) beat rotary + sdpa there at
    head sizes 80 and 128 (10.6 / 24.5 / 39.3 against 15.7 / 27.0 / 42.2 us at 1 280 / 4 352 / 8 448
    positions and 32 x 80 heads); at 16 640 positions the decode step took the same time either way,
    and at batch 8 the two were within 5 %. With grouped KV heads each query head's program reads its
    group's keys again, and sdpa (enable_gqa) was up to 1.4x faster (32 query heads on 8 KV heads x
    128 at 8 448 positions: 31.4 against 23.8 us); docs/benchmarks.md."""
    return batch == 1 and heads == kv_heads and length <= DECODE_ATTENTION_MAX_KEYS


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, n_keys: Tensor, scale: float,
                     bias: Tensor | None = None) -> Tensor:
    """Attention of one query per sequence and head over a static KV buffer.

    q: (B, H, D); keys, values: (B, KV, L, D), H a multiple of KV; mask: (B, L) bool, True where a
    key may be attended to; n_keys: () int64 tensor, no key at or after it is attended to (the Triton
    kernel does not read them); bias: `mask_bias(mask, q.dtype)` or None, used by the sdpa path in
    place of the mask. Returns (B, H, D).

    The split-KV Triton kernel runs where `split_kv_applies`; everything else goes to sdpa (cuDNN /
    flash)."""
    kernels = _decode_kernels(q)
    if (kernels is not None and split_kv_applies(q.shape[0], q.shape[1], keys.shape[1], keys.shape[2])
            and keys.stride(-1) == 1 and values.stride(-1) == 1):
        return kernels.decode_attention(q.contiguous(), keys, values, mask, n_keys, scale)
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values,
                                         attn_mask=bias if bias is not None else mask[:, None, None, :],
                                         scale=scale, enable_gqa=keys.shape[1] != q.shape[1])
    return out[:, :, 0]


def attend(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slot: Tensor,
           n_keys: Tensor, heads: int, scale: float, bias: Tensor | None = None) -> Tensor:
    """An attention layer's decode step from its projection qkv (B, (H + 2 KV) D): `rope_kv` (the new
    key and value written at `slot`), then `decode_attention` over the positions before `n_keys`
    (= slot + 1, passed in so that it is made once per step; the one-kernel path reads only `slot`).
    Returns (B, H, D) in qkv's dtype.

    Where the split-KV kernel runs (`split_kv_applies`) both happen in it (`triton_decode.attend_step`):
    the queries and the new key are rotated in registers and the new key attended to from them, which
    saves the rotary kernel's launch and a round trip of the queries through memory."""
    kernels = _decode_kernels(qkv)
    if (kernels is not None and split_kv_applies(qkv.shape[0], heads, keys.shape[1], keys.shape[2])
            and qkv.dtype == keys.dtype == values.dtype and qkv.stride(-1) == 1 and cos.stride(-1) == 1
            and sin.stride(-1) == 1 and keys.stride(-1) == 1 and values.stride(-1) == 1):
        return kernels.attend_step(qkv, cos, sin, keys, values, mask, slot, heads, scale)
    q = rope_kv(qkv, cos, sin, keys, values, slot, heads)
    return decode_attention(q.to(keys.dtype), keys, values, mask, n_keys, scale, bias=bias).to(qkv.dtype)


def mamba_step(zxbcdt: Tensor, conv_state: Tensor, ssm_state: Tensor, conv_weight: Tensor, conv_bias: Tensor,
               dt_bias: Tensor, A_log: Tensor, D: Tensor, norm_weight: Tensor, eps: float, ngroups: int) -> Tensor:
    """A Mamba-2 mixer's decode step from its input projection zxbcdt (B, 2 DI + 2 G N + H): the causal
    conv over [x | B | C] with its state (B, DI + 2 G N, W - 1) shifted by one, SiLU, the SSM state
    (B, H, P, N) advanced by one step (`ssd_step`), and the gated RMSNorm over groups of DI / G channels.
    Both states are updated in place; returns (B, DI) in zxbcdt's dtype.

    On CUDA in bf16/fp16 one Triton kernel does all of it (`triton_decode.mamba_step`), outside
    `torch.compile`; otherwise the PyTorch ops below (with `ssd_step` and `gated_rmsnorm` dispatching
    as usual)."""
    kernels = _decode_kernels(zxbcdt)
    if (kernels is not None and not torch.compiler.is_compiling() and zxbcdt.dim() == 2
            and all(t.stride(-1) == 1 for t in (zxbcdt, conv_state, ssm_state)) and conv_weight.is_contiguous()):
        return kernels.mamba_step(zxbcdt, conv_state, ssm_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                  norm_weight, float(eps), ngroups)
    b = zxbcdt.shape[0]
    _, h, p, n = ssm_state.shape
    di, gn = h * p, ngroups * n
    z, xbc, dt_raw = torch.split(zxbcdt, [di, di + 2 * gn, h], dim=-1)
    window = torch.cat([conv_state.to(xbc.dtype), xbc[:, :, None]], dim=-1)     # (B, C, W)
    conv_state.copy_(window[:, :, 1:])
    xbc = F.silu((window * conv_weight).sum(-1) + conv_bias)
    x, B, C = torch.split(xbc, [di, gn, gn], dim=-1)
    cd = torch.float64 if zxbcdt.dtype == torch.float64 else torch.float32
    dt = F.softplus(dt_raw.to(cd) + dt_bias.to(cd))
    A = -torch.exp(A_log.to(cd))
    y = ssd_step(ssm_state, x.reshape(b, h, p), dt, A, B.reshape(b, ngroups, n), C.reshape(b, ngroups, n), D.to(cd))
    return gated_rmsnorm(y.reshape(b, di), z, norm_weight, eps, di // ngroups)


__all__ = ["ssd", "ssd_step", "gated_rmsnorm", "backend_for", "ssd_ref", "linear", "rope_kv", "decode_attention",
           "attend", "split_kv_applies", "mask_bias", "mamba_step"]
