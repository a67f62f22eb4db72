"""The engine's fused decode step: a decoder layer as two to four matrix-vector products.

At batch 1 a decode step streams every weight once; what costs time beyond that is many small
kernels and matrix-vector products too small to reach memory bandwidth. So for one-token steps the
engine runs its own forward over the model's weights, with the products that share an input fused:

- Phi (attention and MLP in parallel on one LayerNorm output): [q; k; v; fc1] (or a Mamba layer's
  [in_proj; fc1]) is one product with the LayerNorm folded in; then fc2 over GELU(fc1), with both
  biases and the residual folded in, runs on a second CUDA stream while the mixer (rotary, cache
  write and attention, or the Mamba step) runs on the first, and the mixer's output projection adds
  onto it. The mixer is latency-bound at short contexts and the product bandwidth-bound, so the two
  overlap (on the H100 this beat one [dense | fc2] product after the mixer; docs/benchmarks.md). At
  batch 1 GELU is the first product's epilogue (once per feature; on fc2's inputs every program would
  compute it again); for larger batches it is applied to fc2's input, where cuBLAS runs.
- Llama, Mistral, Qwen2 (sequential): RMSNorm + [q; k; v], o (+ residual), RMSNorm + [gate; up],
  down over silu(gate) * up (+ residual).

The fused input matrices are built once by concatenating each layer's weights and pointing the
modules' weights at slices of them (`Parameter.data` becomes a view), so the model holds its weights once and
the prefill, which runs transformers' own layers, reads the same memory. The products go through
`ops.linear` (a Triton matrix-vector kernel on CUDA at batch 1), the rotary embedding, cache write
and attention through `ops.attend` (one split-KV kernel for short buffers of one sequence or of
sequences each at its own position; a rotary kernel and sdpa otherwise), and the Mamba-2 layers take
their decode step from `Mamba2Mixer.step_projected`. The step runs eagerly and is captured as a CUDA graph (compiling it
with inductor did not finish in minutes; docs/benchmarks.md).

The rotary embedding's cos and sin come from tables the model's own rotary module computes once for
every cache position (bit-for-bit its per-step values; not for rope types that rescale with the length).

The reference is the engine's unfused step (transformers' layers); tests compare the two.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..model.hybrid import attention_names, attention_shape, decoder_stack, text_config
from ..model.mixer import Mamba2Mixer

log = logging.getLogger("matvlm.engine")

PARALLEL = ("phi",)
SEQUENTIAL = ("llama", "mistral", "qwen2")


def _fuse_rows(linears: list[nn.Linear]) -> tuple[Tensor, Tensor | None]:
    """One (sum N, K) weight for Linear layers that share their input; each layer's weight becomes a
    view of its rows. The bias is the concatenation (zeros where a layer has none), or None."""
    weight = torch.cat([m.weight.data for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        start += n
    if all(m.bias is None for m in linears):
        return weight, None
    bias = torch.cat([m.bias.data if m.bias is not None else weight.new_zeros(m.weight.shape[0]) for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        if m.bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu",
               "silu": "silu_mul", "swish": "silu_mul"}


def _norm_spec(module: nn.Module):
    """("layer" | "rms", weight, bias, eps) of a LayerNorm or a transformers RMSNorm, or None."""
    if isinstance(module, nn.LayerNorm):
        return ("layer", module.weight, module.bias, module.eps)
    if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
        return ("rms", module.weight, None, module.variance_epsilon)
    return None


@dataclass
class _Attention:
    """What a fused step needs of an attention module."""

    module: nn.Module
    heads: int
    kv_heads: int
    head_dim: int

    def __call__(self, qkv: Tensor, cos: Tensor, sin: Tensor, kv_cache, mask: tuple, slot: Tensor,
                 n_keys: Tensor) -> Tensor:
        """qkv: (B, (H + 2 KV) D) projected; cos, sin: (B, R), the rotary embedding of the first R
        channels of each head (R < D for Phi's partial rotary); mask: the (B, L) bool key mask and its
        `ops.mask_bias`; writes k, v at `slot`; returns (B, H D)."""
        b = qkv.shape[0]
        if getattr(self.module, "qk_layernorm", False):          # Phi's optional per-head LayerNorm
            hd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
            q = self.module.q_layernorm(qkv[:, :hd].reshape(b, self.heads, self.head_dim))
            k = self.module.k_layernorm(qkv[:, hd:hd + kvd].reshape(b, self.kv_heads, self.head_dim))
            qkv = torch.cat([q.flatten(1), k.flatten(1), qkv[:, hd + kvd:]], -1)
        keys, values = kv_cache.keys, kv_cache.values
        bias = mask[1] if mask[1].dtype == keys.dtype else None
        out = ops.attend(qkv, cos, sin, keys, values, mask[0], slot, n_keys, self.heads, self.module.scaling, bias=bias)
        return out.reshape(b, self.heads * self.head_dim).to(qkv.dtype)


@dataclass
class _Layer:
    norm: tuple                  # the input norm's ops.NormSpec
    mixer: _Attention | Mamba2Mixer
    act: str                     # the MLP's activation (ops.linear's `act`)
    w_in: Tensor                 # parallel: [mixer in; fc1]; sequential: the mixer's input projection
    b_in: Tensor | None
    w_out: Tensor                # the mixer's output projection
    b_out: Tensor | None         # parallel: the sum of its and fc2's biases (a copy); sequential: its bias
    mixer_in: int                # output features of `w_in` that belong to the mixer
    post_norm: tuple | None = None               # sequential only
    w_up: Tensor | None = None                   # [gate; up]
    b_up: Tensor | None = None
    w_down: Tensor | None = None
    b_down: Tensor | None = None
    w_fc2: Tensor | None = None                  # parallel only


def unsupported(model: nn.Module) -> str | None:
    """Why `FusedDecoder` cannot run `model`'s decode step, or None if it can."""
    tc = text_config(model.config)
    if tc.model_type not in PARALLEL + SEQUENTIAL:
        return f"no fused decode step for {tc.model_type!r} models"
    if getattr(tc, "hidden_act", None) not in ACTIVATIONS:
        return f"activation {getattr(tc, 'hidden_act', None)!r} is not one the fused step has"
    for layer in decoder_stack(model).layers:
        norms = [layer.input_layernorm] + ([layer.post_attention_layernorm] if tc.model_type in SEQUENTIAL else [])
        if any(_norm_spec(n) is None for n in norms):
            return f"norm {type(norms[0]).__name__} is not one the fused step has"
    return None


class FusedDecoder:
    """The decode step of `model` (hybrid or teacher) with fused projections; see the module doc."""

    def __init__(self, model: nn.Module, stack: nn.Module, norm: nn.Module):
        """Build it through `fused_decoder`, which first checks that the model is one it covers."""
        tc = text_config(model.config)
        self.parallel = tc.model_type in PARALLEL
        self.stack = stack
        self.norm = _norm_spec(norm)
        self.head = model.get_output_embeddings()
        # the rotary embedding's cos and sin by position, computed once by the model's own module (its
        # ~10 small kernels took 15-20 us of a 2.3 ms batch-1 step on an H100; a lookup is two kernels).
        # Rope types that rescale with the sequence length ("dynamic", "longrope") are computed each step.
        rope_type = str(getattr(stack.rotary_emb, "rope_type", "default"))
        self._rope_by_position = "dynamic" not in rope_type and rope_type != "longrope"
        self._rope_tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._rope_kept: list[tuple[Tensor, Tensor]] = []   # every table built: captured graphs read the old ones
        self._side: torch.cuda.Stream | None = None     # Phi: the MLP's second product runs beside the mixer
        self.side_stream = True                           # False: fc2 runs before the mixer on one stream
        act = ACTIVATIONS[tc.hidden_act]
        if self.parallel and act == "silu_mul":
            raise ValueError("a parallel (Phi) MLP with a gated activation")
        names = attention_names(model.config)
        heads, kv_heads, head_dim = attention_shape(model.config)
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in stack.layers:
                mixer = layer.self_attn
                if isinstance(mixer, Mamba2Mixer):
                    ins, outs, fused = [mixer.in_proj], [mixer.out_proj], mixer
                else:
                    ins = [getattr(mixer, n) for n in (names.q, names.k, names.v)]
                    outs = [getattr(mixer, names.o)]
                    fused = _Attention(mixer, heads, kv_heads, head_dim)
                mixer_in = sum(m.weight.shape[0] for m in ins)
                mlp = layer.mlp
                if self.parallel:
                    w_in, b_in = _fuse_rows(ins + [mlp.fc1])
                    biases = [m.bias for m in (outs[0], mlp.fc2) if m.bias is not None]
                    b_out = torch.stack(biases).sum(0) if biases else None
                    self.layers.append(_Layer(_norm_spec(layer.input_layernorm), fused, act, w_in, b_in,
                                              outs[0].weight, b_out, mixer_in, w_fc2=mlp.fc2.weight))
                else:
                    w_in, b_in = _fuse_rows(ins)
                    w_up, b_up = _fuse_rows([mlp.gate_proj, mlp.up_proj])
                    self.layers.append(_Layer(_norm_spec(layer.input_layernorm), fused, act, w_in, b_in,
                                              outs[0].weight, outs[0].bias, mixer_in,
                                              _norm_spec(layer.post_attention_layernorm), w_up, b_up,
                                              mlp.down_proj.weight, mlp.down_proj.bias))

    def forward(self, embeds: Tensor, position: Tensor, mask4d: Tensor, pad2d: Tensor | None, cache) -> Tensor:
        """One decode step: embeds (B, 1, d), position (B, 1), mask4d (B, 1, 1, L) bool over the cache
        slots; writes the cache at its slot. Returns the logits (B, V) in float32."""
        cos, sin = self._rotary(embeds, position, mask4d.shape[-1])      # (B, rotary)
        mask = (mask4d[:, 0, 0], ops.mask_bias(mask4d[:, 0, 0], embeds.dtype))   # (B, L) bool, its additive form
        slot = cache.slot
        n_keys = slot + 1
        h = embeds[:, 0]                                                # (B, d)
        side = main = None
        if self.parallel and h.is_cuda and self.side_stream:
            main = torch.cuda.current_stream(h.device)
            if self._side is None:
                self._side = torch.cuda.Stream(h.device)
            side = self._side
        for layer, state in zip(self.layers, cache.layers):
            if self.parallel:        # h + mixer(LN h) + fc2(act(fc1(LN h))): two products
                # GELU goes into the first product's epilogue for one row (free in the Triton kernel), onto
                # the second product's input for more (cuBLAS then: one slice-and-activate either way).
                early = h.shape[0] == 1
                y = ops.linear(h, layer.w_in, layer.b_in, norm=layer.norm, out_act=layer.act if early else None,
                               out_act_from=layer.mixer_in)
                if side is not None:                        # fc2 on a second stream while the mixer runs
                    side.wait_stream(main)
                with torch.cuda.stream(side):               # None (CPU): no stream change
                    mlp = ops.linear(None, layer.w_fc2, layer.b_out, residual=h, tail=y[:, layer.mixer_in:],
                                     act=None if early else layer.act)
                mixed = self._mix(layer, y[:, :layer.mixer_in], state, cos, sin, mask, slot, n_keys)
                if side is not None:
                    main.wait_stream(side)
                h = ops.linear(mixed, layer.w_out, None, residual=mlp)
            else:
                projected = ops.linear(h, layer.w_in, layer.b_in, norm=layer.norm)
                mixed = self._mix(layer, projected, state, cos, sin, mask, slot, n_keys)
                h = ops.linear(mixed, layer.w_out, layer.b_out, residual=h)
                gate_up = ops.linear(h, layer.w_up, layer.b_up, norm=layer.post_norm)
                h = ops.linear(None, layer.w_down, layer.b_down, residual=h, tail=gate_up, act=layer.act)
        return ops.linear(h, self.head.weight, self.head.bias, norm=self.norm).float()

    def _rotary(self, embeds: Tensor, position: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """cos, sin (B, rotary) of the model's rotary embedding at `position` (B, 1), each < `length` (the
        cache's): rows of tables the module computed for positions 0 .. a power of two >= length, built
        outside CUDA-graph capture (the engine runs each step once before capturing it)."""
        key = (embeds.device, embeds.dtype)
        table = self._rope_tables.get(key)           # never built where the rope type rescales with the length
        if (self._rope_by_position and (table is None or table[0].shape[0] < length)
                and not (embeds.is_cuda and torch.cuda.is_current_stream_capturing())):
            n = 1 << max(length - 1, 0).bit_length()
            cos, sin = self.stack.rotary_emb(embeds[:1], torch.arange(n, device=embeds.device)[None])
            table = self._rope_tables[key] = (cos[0], sin[0])
            self._rope_kept.append(table)
        if table is None or table[0].shape[0] < length:
            cos, sin = self.stack.rotary_emb(embeds, position)
            return cos[:, 0], sin[:, 0]
        rows = position.reshape(-1)
        return table[0].index_select(0, rows), table[1].index_select(0, rows)

    @staticmethod
    def _mix(layer: _Layer, projected: Tensor, state, cos, sin, mask, slot, n_keys) -> Tensor:
        if isinstance(layer.mixer, Mamba2Mixer):
            return layer.mixer.step_projected(projected, state)
        return layer.mixer(projected, cos, sin, state, mask, slot, n_keys)


def fused_decoder(model: nn.Module, stack: nn.Module, norm: nn.Module) -> FusedDecoder | None:
    """A `FusedDecoder` for `model`, or None (logged) where it cannot run the model's decode step."""
    why = unsupported(model)
    if why:
        log.info("%s; decoding through the model's own layers", why)
        return None
    return FusedDecoder(model, stack, norm)
