"""A matvlm hybrid of a Llama-, Mistral- or Qwen2-family decoder as transformers' Bamba, and back.

Bamba (`BambaForCausalLM`, `model_type: bamba`; transformers' models/bamba) is a decoder whose layers
are RoPE attention (at `attn_layer_indices`) or a standard Mamba-2 mixer, each followed by a SwiGLU
MLP, with RMSNorm before both. That is exactly a matvlm hybrid of these families:

    matvlm (Llama-family layer)                 Bamba layer
    input_layernorm, post_attention_layernorm   input_layernorm, pre_ff_layernorm
    mlp.{gate,up,down}_proj                     feed_forward.{gate,up,down}_proj
    self_attn.{q,k,v,o}_proj  (attention)       self_attn.{q,k,v,o}_proj
    self_attn = Mamba2Mixer   (Mamba)           mamba: in_proj [z|x|B|C|dt], conv1d over [x|B|C],
                                                dt_bias, A_log, D, norm (gated), out_proj
    norm                                        final_layernorm

The mixers need no reshaping: matvlm's x and B rows are already one per *query* head (grouped-query
K/V heads are repeated at conversion, `convert.init`), so `mamba_n_heads = nheads`,
`mamba_n_groups = ngroups` and the conv channels are copied as they are. Bamba's gated norm groups
channels by `intermediate_size / n_groups` (its `BambaRMSNormGated` from transformers 5.23; earlier
releases normalise all channels at once, so `export` refuses them; vLLM's `Mixer2RMSNormGated` groups
the same), matvlm's by `d_inner / ngroups`: the same groups.

One difference needs a transformation: Bamba has a single epsilon (`rms_norm_eps`) for every norm, the
mixers' gated norm included, while a matvlm hybrid keeps the decoder's epsilon and gives its mixers
their own (`HybridConfig.norm_eps`, 1e-5). RMSNorm(s·h; e) = RMSNorm(h; e/s²), so scaling the whole
residual stream by s = sqrt(norm_eps / rms_norm_eps) (embeddings, image features and every output
projection that adds to it) makes Bamba's decoder norms with e = norm_eps compute exactly the
decoder's norms, while the mixers (whose inputs are normed) are unchanged. The final norm removes s
before the LM head, which is written untied when the embedding is scaled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from ..errors import MatvlmError

FAMILIES = ("llama", "mistral", "qwen2")
CHUNK_SIZE = 256                     # Bamba's default `mamba_chunk_size` (the scan is exact at any)

# --- key templates: matvlm's live (transformers) names <-> Bamba's, below the decoder stack ---------

# (matvlm name, Bamba name, the projections {p} may be, layer kind): {i} a layer index, {w} weight|bias,
# {s} a mixer parameter. Layer kind "attn" / "mamba": the row holds only in that kind of layer.
DECODER_KEYS: list[tuple[str, str, str, str | None]] = [
    ("embed_tokens.weight", "embed_tokens.weight", "", None),
    ("norm.weight", "final_layernorm.weight", "", None),
    ("layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.weight", "", None),
    ("layers.{i}.post_attention_layernorm.weight", "layers.{i}.pre_ff_layernorm.weight", "", None),
    ("layers.{i}.mlp.{p}.{w}", "layers.{i}.feed_forward.{p}.{w}", "gate_proj|up_proj|down_proj", None),
    ("layers.{i}.self_attn.{p}.{w}", "layers.{i}.self_attn.{p}.{w}", "q_proj|k_proj|v_proj|o_proj", "attn"),
    ("layers.{i}.self_attn.{p}.{w}", "layers.{i}.mamba.{p}.{w}", "in_proj|out_proj|conv1d|norm", "mamba"),
    ("layers.{i}.self_attn.{s}", "layers.{i}.mamba.{s}", "", "mamba"),
]

# Bamba names (below the decoder stack) that add to the residual stream, hence scaled by s.
RESIDUAL_WRITERS = re.compile(r"^(embed_tokens\.weight|layers\.\d+\.(self_attn\.o_proj|feed_forward\.down_proj|"
                              r"mamba\.out_proj)\.(weight|bias))$")


def _pattern(template: str, projections: str) -> re.Pattern:
    """'layers.{i}.mlp.{p}.{w}' -> a regex with one named group per field."""
    fields = {"i": r"\d+", "p": projections, "w": "weight|bias", "s": "dt_bias|A_log|D"}
    out = re.escape(template)
    for name, rx in fields.items():
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(f"^{out}$")


_ROWS = [(_pattern(ours, p), _pattern(theirs, p), ours, theirs, kind) for ours, theirs, p, kind in DECODER_KEYS]


def rename_decoder_key(key: str, mamba_layers: set[int], to_bamba: bool) -> str:
    """One key below the decoder stack, from matvlm's names to Bamba's (`to_bamba`) or back. An unknown
    key, or one of the wrong layer kind, is an error naming it."""
    for ours_rx, theirs_rx, ours, theirs, kind in _ROWS:
        m = (ours_rx if to_bamba else theirs_rx).match(key)
        if not m:
            continue
        fields = m.groupdict()
        if kind is not None and (int(fields["i"]) in mamba_layers) != (kind == "mamba"):
            what = "a Mamba-2 mixer weight" if kind == "mamba" else "an attention weight"
            raise MatvlmError(f"weight {key!r} is {what}, but layer {fields['i']} is "
                              f"{'an attention' if kind == 'mamba' else 'a Mamba'} layer")
        return (theirs if to_bamba else ours).format(**fields)
    side = "matvlm decoder" if to_bamba else "Bamba"
    raise MatvlmError(f"unknown {side} weight name {key!r} (no Bamba mapping for it)")


# --- configs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class BambaLayout:
    """What the export decided, beyond the weights: Bamba's config and the residual scale."""

    config: dict               # BambaConfig keyword arguments
    residual_scale: float      # s (1.0 when the decoder's and the mixers' epsilons agree)
    untie: bool                # lm_head written on its own (tied embedding scaled by s)


def check_exportable(tc, hcfg, where: str) -> None:
    """One-line errors for what Bamba cannot express exactly (tc: the decoder's config)."""
    mt = tc.model_type
    if mt == "phi":
        raise MatvlmError(
            f"{where}: Phi-family decoders (attention and MLP in parallel from one LayerNorm with bias, partial "
            "rotary) match no transformers-native hybrid, so --format bamba cannot hold them; serve them with "
            "`matvlm serve`, or in vLLM through a model plugin (design in docs/vllm-plugin.md)")
    if mt not in FAMILIES:
        raise MatvlmError(f"{where}: decoder family {mt!r} has no Bamba export; supported: {', '.join(FAMILIES)}")
    heads, head_dim = tc.num_attention_heads, getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    if heads * head_dim != tc.hidden_size:
        raise MatvlmError(f"{where}: attention has {heads} heads x {head_dim} = {heads * head_dim} channels, not "
                          f"hidden_size {tc.hidden_size}; Bamba (and vLLM's loader) take head_dim = hidden_size / heads")
    if tc.hidden_act != "silu":
        raise MatvlmError(f"{where}: hidden_act {tc.hidden_act!r}; Bamba uses hidden_act for both the MLP and the "
                          "Mamba conv, which must be silu")
    if hcfg.d_inner % tc.hidden_size:
        raise MatvlmError(f"{where}: Mamba d_inner {hcfg.d_inner} is not a whole multiple of hidden_size "
                          f"{tc.hidden_size} (Bamba's mamba_expand is an integer)")
    windows = [t for t in (getattr(tc, "layer_types", None) or []) if t != "full_attention"]
    window = getattr(tc, "sliding_window", None)
    if windows or (getattr(tc, "use_sliding_window", mt == "mistral") and window
                   and window < tc.max_position_embeddings):
        raise MatvlmError(f"{where}: sliding-window attention (window {window}) has no Bamba equivalent")
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise MatvlmError(f"{where}: partial rotary ({rope['partial_rotary_factor']}) is not supported")


def bamba_layout(tc, hcfg, attention_bias: bool, dtype: torch.dtype) -> BambaLayout:
    """Bamba's config for decoder config `tc` with mixers `hcfg` (see the module doc for s)."""
    eps_decoder, eps_mixer = float(tc.rms_norm_eps), float(hcfg.norm_eps)
    same = math.isclose(eps_mixer, eps_decoder, rel_tol=1e-6)     # e.g. 1e-5 read back from a float32 GGUF field
    scale = math.sqrt(eps_mixer / eps_decoder) if hcfg.mamba_layers and not same else 1.0
    eps = eps_mixer if hcfg.mamba_layers else eps_decoder
    tied = bool(getattr(tc, "tie_word_embeddings", False))
    untie = tied and scale != 1.0
    rope = dict(tc.rope_parameters)
    rope["partial_rotary_factor"] = 1.0                   # BambaConfig's own default is 0.5
    head_dim = tc.hidden_size // tc.num_attention_heads
    cfg = dict(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size, intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads,
        hidden_act=tc.hidden_act, initializer_range=getattr(tc, "initializer_range", 0.02), rms_norm_eps=eps,
        max_position_embeddings=tc.max_position_embeddings, attention_dropout=0.0,
        pad_token_id=tc.pad_token_id, bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id,
        tie_word_embeddings=tied and not untie, rope_parameters=rope,
        attention_bias=attention_bias, mlp_bias=bool(getattr(tc, "mlp_bias", False)),
        attn_layer_indices=hcfg.attn_layers,
        mamba_n_heads=hcfg.nheads, mamba_d_head=hcfg.headdim, mamba_n_groups=hcfg.ngroups,
        mamba_d_state=hcfg.d_state, mamba_d_conv=hcfg.d_conv, mamba_expand=hcfg.d_inner // tc.hidden_size,
        mamba_chunk_size=CHUNK_SIZE, mamba_conv_bias=True,
        mamba_proj_bias=bool(hcfg.in_proj_bias or hcfg.out_proj_bias),
        time_step_limit=(0.0, float("inf")),              # matvlm clamps no time step
        # vLLM's Bamba (<= 0.23) takes the rotary width from here, not from rope_parameters
        attn_rotary_emb=head_dim,
        dtype=str(dtype).removeprefix("torch."),
    )
    return BambaLayout(cfg, scale, untie)


# --- weights -----------------------------------------------------------------------------------

def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    return t if s == 1.0 else (t.double() * s).to(t.dtype)


def to_bamba_tensors(state: dict[str, torch.Tensor], stack: str, hcfg, layout: BambaLayout,
                     also_scaled: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`state` (a matvlm hybrid's state_dict; its decoder stack under prefix `stack`, e.g. "model.")
    under Bamba's names with the same prefix; other keys (vision tower, projector, lm_head) keep theirs.
    Biases Bamba's flags imply but the model lacks (e.g. Qwen2's o_proj under `attention_bias`) are zeros.
    Residual writers, and keys starting with one of `also_scaled` (a VLM's projector output), are
    multiplied by the layout's residual scale."""
    cfg, s, mamba = layout.config, layout.residual_scale, set(hcfg.mamba_layers)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not key.startswith(stack):
            out[key] = _scaled(t, s) if key.startswith(also_scaled) and also_scaled else t
            continue
        name = rename_decoder_key(key[len(stack):], mamba, to_bamba=True)
        out[stack + name] = _scaled(t, s) if RESIDUAL_WRITERS.match(name) else t
    embed = state[f"{stack}embed_tokens.weight"]
    if layout.untie:
        out["lm_head.weight"] = embed.clone()
    elif cfg["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)

    def zero_bias(weight_key: str) -> None:
        bias_key = weight_key[: -len("weight")] + "bias"
        if bias_key not in out:
            w = out[weight_key]
            out[bias_key] = torch.zeros(w.shape[0], dtype=w.dtype)

    for i in range(cfg["num_hidden_layers"]):
        pre = f"{stack}layers.{i}."
        if i in mamba and cfg["mamba_proj_bias"]:
            for p in ("in_proj", "out_proj"):
                zero_bias(f"{pre}mamba.{p}.weight")
        if i not in mamba and cfg["attention_bias"]:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                zero_bias(f"{pre}self_attn.{p}.weight")
    return out


# --- reading a Bamba directory as a matvlm hybrid ------------------------------------------------

EXPORT_RECORD = "matvlm_export.json"


def hybrid_from_bamba(bc, where: str):
    """(decoder config of the family Bamba config `bc` came from, HybridConfig) with the same function:
    every norm takes Bamba's one epsilon. The family is the exported one (recorded in
    matvlm_export.json, passed as `bc.matvlm_source_family`) where it can hold the weights, else Llama
    (whose `attention_bias` / `mlp_bias` cover every Bamba)."""
    from transformers import AutoConfig

    from ..config import HybridConfig

    rope = dict(bc.rope_parameters or {})
    if float(rope.pop("partial_rotary_factor", 0.5)) != 1.0:
        raise MatvlmError(f"{where}: Bamba with partial rotary (transformers' default for Bamba, 0.5) has no "
                          "Llama-family equivalent; matvlm reads Bamba directories with full rotary only")
    if tuple(bc.time_step_limit or (0.0, math.inf)) != (0.0, math.inf) or not bc.mamba_conv_bias:
        raise MatvlmError(f"{where}: Bamba with a time-step limit {bc.time_step_limit} or no conv bias is not a "
                          "matvlm hybrid (its mixers clamp no time step and have a conv bias)")
    family = getattr(bc, "matvlm_source_family", "llama")
    if (family == "qwen2" and not bc.attention_bias) or (family != "llama" and bc.mlp_bias) or \
            (family == "mistral" and bc.attention_bias) or family not in FAMILIES:
        family = "llama"
    kw = dict(vocab_size=bc.vocab_size, hidden_size=bc.hidden_size, intermediate_size=bc.intermediate_size,
              num_hidden_layers=bc.num_hidden_layers, num_attention_heads=bc.num_attention_heads,
              num_key_value_heads=bc.num_key_value_heads, hidden_act=bc.hidden_act, rms_norm_eps=bc.rms_norm_eps,
              max_position_embeddings=bc.max_position_embeddings, initializer_range=bc.initializer_range,
              pad_token_id=bc.pad_token_id, bos_token_id=bc.bos_token_id, eos_token_id=bc.eos_token_id,
              tie_word_embeddings=bc.tie_word_embeddings, rope_parameters=rope)
    if family == "llama":
        kw.update(attention_bias=bc.attention_bias, mlp_bias=bc.mlp_bias)
    if family == "qwen2":
        kw.update(use_sliding_window=False)
    tc = AutoConfig.for_model(family, **kw)
    n = bc.num_hidden_layers
    attn = set(bc.attn_layer_indices or [])
    hcfg = HybridConfig(n_layer=n, mamba_layers=[i for i in range(n) if i not in attn], d_model=bc.hidden_size,
                        nheads=bc.mamba_n_heads, headdim=bc.mamba_d_head, ngroups=bc.mamba_n_groups,
                        d_state=bc.mamba_d_state, d_conv=bc.mamba_d_conv, in_proj_bias=bc.mamba_proj_bias,
                        out_proj_bias=bc.mamba_proj_bias, norm_eps=bc.rms_norm_eps,
                        source={"format": "bamba", "path": where})
    return tc, hcfg


def from_bamba_tensors(tensors: dict[str, torch.Tensor], stack: str, hcfg, family: str) -> dict[str, torch.Tensor]:
    """Bamba-named `tensors` (decoder stack under `stack`) under matvlm's live names. For Qwen2 the
    o_proj biases (zeros Bamba's `attention_bias` implies) are dropped; they must be zero."""
    out, mamba = {}, set(hcfg.mamba_layers)
    for key, t in tensors.items():
        if not key.startswith(stack):
            out[key] = t
            continue
        name = rename_decoder_key(key[len(stack):], mamba, to_bamba=False)
        if family == "qwen2" and name.endswith("self_attn.o_proj.bias"):
            if t.abs().max() != 0:
                raise MatvlmError(f"{key} is not zero; a Qwen2 decoder has no o_proj bias")
            continue
        out[stack + name] = t
    return out


def load_bamba_dir(path, dtype: torch.dtype | None, attn_implementation: str | None):
    """A Bamba directory (`BambaForCausalLM`, or a llava-hf VLM whose text model is one) as a matvlm
    hybrid of a Llama-family decoder with the same logits."""
    import json
    from pathlib import Path

    from transformers import AutoConfig

    from ..model import io
    from ..model.hybrid import decoder_stack, make_hybrid

    path = Path(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    is_vlm = hasattr(config, "text_config")
    bc = config.text_config if is_vlm else config
    record = path / EXPORT_RECORD
    if record.is_file():
        bc.matvlm_source_family = json.loads(record.read_text()).get("source_family", "llama")
    tc, hcfg = hybrid_from_bamba(bc, str(path))
    if is_vlm:
        config.text_config = tc
        arch = "LlavaForConditionalGeneration"
    else:
        config, arch = tc, f"{type(tc).__name__.removesuffix('Config')}ForCausalLM"
    io.set_attn_implementation(config, attn_implementation)
    model = io.build_empty(config, arch)
    make_hybrid(model, hcfg)
    stack = next(n for n, m in model.named_modules() if m is decoder_stack(model)) + "."
    tensors = io.read_tensors(io.weight_files(path), dtype)
    io.load_into(model, from_bamba_tensors(tensors, stack, hcfg, tc.model_type), str(path))
    return model.eval()
