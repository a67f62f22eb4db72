"""One copy of the frozen weights for teacher and student (DESIGN.md, issue 3).

The student is the hybrid module tree. The teacher pass runs the *same* tree with, swapped in,
each replaced layer's original attention (frozen) and a frozen copy of every other module the
student trains (the connector by default). Nothing else is duplicated: vision tower, embeddings,
MLPs, norms, the remaining attention layers and the LM head are shared, frozen tensors.

`DistillStep` is the module the trainer wraps (DDP etc.): its forward runs, for one micro-batch,
the vision tower once, the teacher pass (no grad, capturing the inputs and outputs of the Mamba
layers), the student pass, and each student Mamba layer on the teacher's input to that layer,
and returns per-micro-batch loss sums.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..convert import formats
from ..convert.init import hybridize
from ..convert.layers import select_layers
from ..errors import MatvlmError
from ..model.hybrid import decoder_layers, decoder_stack, hybrid_config_for, text_config
from ..model.vlm import connector, embed, is_vlm, vision_features
from . import losses


@dataclass
class TeacherSwap:
    """(parent module, attribute name, frozen teacher module) triples swapped in for the teacher pass."""

    swaps: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def add(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        module.requires_grad_(False)
        self.swaps.append((parent, name, module))

    @contextmanager
    def active(self):
        students = [getattr(p, n) for p, n, _ in self.swaps]
        for p, n, t in self.swaps:
            setattr(p, n, t)
        try:
            yield
        finally:
            for (p, n, _), s in zip(self.swaps, students):
                setattr(p, n, s)


def trainable_modules(model: nn.Module, groups: list[str]) -> list[nn.Module]:
    """The modules whose parameters train, for the groups mamba / connector / mlp / all."""
    mods: list[nn.Module] = []
    mixers = model.mamba_mixers
    if "mamba" in groups or "all" in groups:
        mods += list(mixers.values())
    if ("connector" in groups or "all" in groups) and connector(model) is not None:
        mods.append(connector(model))
    if "mlp" in groups:
        layers = decoder_layers(model)
        mods += [layers[i].mlp for i in mixers]
    if "all" in groups:
        mods += [decoder_stack(model), model.get_output_embeddings()]
    return mods


def check_compatible(teacher: nn.Module, student: nn.Module, teacher_dir, student_dir) -> None:
    """Refuse a student that was not converted from this teacher (before any compute)."""
    t, s = text_config(teacher.config), text_config(student.config)
    for attr in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if getattr(t, attr, None) != getattr(s, attr, None):
            raise MatvlmError(f"student {student_dir} does not match teacher {teacher_dir}: {attr} is "
                              f"{getattr(s, attr, None)} vs {getattr(t, attr, None)}")
    if is_vlm(teacher) != is_vlm(student):
        raise MatvlmError(f"student {student_dir} and teacher {teacher_dir} differ: one is a VLM, the other not")


def _load_student_weights(model: nn.Module, student: nn.Module, trainable_names: set[str], student_dir) -> None:
    """Copy trainable tensors from the student; every frozen tensor the two share must be identical."""
    own = model.state_dict()
    for name, tensor in student.state_dict().items():
        if name not in own:
            raise MatvlmError(f"student {student_dir} has a tensor the teacher-based model lacks: {name}")
        if name in trainable_names:
            own[name].copy_(tensor)
        elif not torch.equal(own[name], tensor.to(own[name].dtype)):
            raise MatvlmError(f"student {student_dir} differs from the teacher in frozen tensor {name}: "
                              "it was not converted from this teacher (or train more groups with --train)")


def build(teacher_dir: str | Path | nn.Module, student_dir: str | Path | None = None,
          mamba_ratio: float | None = None, placement: str = "even", train: list[str] = ("mamba", "connector"),
          dtype: torch.dtype | None = None, seed: int = 0) -> tuple[nn.Module, TeacherSwap, list[str]]:
    """The hybrid student (one module tree), the teacher swaps, and the names of trainable parameters.

    `teacher_dir` may also be a loaded teacher (from `matvlm.load`), which is turned into the student
    in place. Frozen weights are kept in `dtype` (default: the checkpoint's); trainable ones in float32.
    """
    model = teacher_dir if isinstance(teacher_dir, nn.Module) else formats.load(teacher_dir, dtype=dtype)
    if model.hybrid_config.mamba_layers:
        raise MatvlmError(f"teacher {teacher_dir} is itself a hybrid (Mamba layers "
                          f"{model.hybrid_config.mamba_layers}); give the original transformer")
    teacher = TeacherSwap()
    frozen_copies = {}
    if "all" in train:
        stack_parent, stack_name = (model.model, "language_model") if is_vlm(model) else (model, "model")
        frozen_copies[(stack_parent, stack_name)] = copy.deepcopy(getattr(stack_parent, stack_name))
        frozen_copies[(model, "lm_head")] = copy.deepcopy(model.lm_head)
    if ("connector" in train or "all" in train) and connector(model) is not None:
        frozen_copies[(model.model, "multi_modal_projector")] = copy.deepcopy(connector(model))

    student = None
    if student_dir is not None:
        student = formats.load(student_dir, dtype=dtype)
        check_compatible(model, student, teacher_dir, student_dir)
        cfg = student.hybrid_config
        if not cfg.mamba_layers:
            raise MatvlmError(f"student {student_dir} has no Mamba layers; convert the teacher first")
    else:
        layers = select_layers(len(decoder_layers(model)), mamba_ratio, placement)
        cfg = hybrid_config_for(model, layers, source={"teacher": str(teacher_dir), "placement": placement,
                                                       "mamba_ratio": mamba_ratio, "seed": seed})
    replaced = hybridize(model, cfg, seed=seed, init=student is None)
    if "mlp" in train:
        for i in cfg.mamba_layers:
            frozen_copies[(decoder_layers(model)[i], "mlp")] = copy.deepcopy(decoder_layers(model)[i].mlp)

    model.requires_grad_(False)
    mods = trainable_modules(model, list(train))
    trainable_names = {n for n, p in model.named_parameters() if any(p is q for m in mods for q in m.parameters())}
    if student is not None:
        _load_student_weights(model, student, trainable_names | _mixer_names(model), student_dir)
        del student

    if "all" not in train:
        for i, attn in replaced.items():
            teacher.add(decoder_layers(model)[i], "self_attn", attn)
    for (parent, name), frozen in frozen_copies.items():
        teacher.add(parent, name, frozen)
    for m in mods:
        m.float().requires_grad_(True)
    for tree in (model, *(t for _, _, t in teacher.swaps)):   # teacher and student: one deterministic network
        for m in tree.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
    return model, teacher, sorted(trainable_names)


def _mixer_names(model: nn.Module) -> set[str]:
    ids = {id(p) for m in model.mamba_mixers.values() for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# --- the step ---------------------------------------------------------------------------------

@contextmanager
def capture_layers(model: nn.Module, indices: list[int], store: dict):
    """Record (input hidden states, output hidden states) of decoder layers `indices` into `store`."""
    layers = decoder_layers(model)
    handles = []
    for i in indices:
        def pre(mod, args, kwargs, i=i):
            store[i] = [(args[0] if args else kwargs["hidden_states"]).detach(), None]

        def post(mod, args, kwargs, out, i=i):
            store[i][1] = (out[0] if isinstance(out, tuple) else out).detach()

        handles.append(layers[i].register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layers[i].register_forward_hook(post, with_kwargs=True))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def require_right_padding(attention_mask: Tensor) -> None:
    """Raise unless every row of a (B, T) mask is its tokens followed by its pads (DistillStep runs its
    passes without the mask, which only right padding allows)."""
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("distillation needs right-padded batches: attention_mask has a token after a pad")


CAUSAL_SDPA = "matvlm_causal_sdpa"
_NO_MASK = f"{CAUSAL_SDPA} is for passes without an attention mask; got one"


def _causal_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa attention for passes with no padding mask (see `causal_attention`)."""
    if attention_mask is not None:
        raise ValueError(_NO_MASK)
    return sdpa_attention_forward(module, query, key, value, None, *args, **kwargs)


AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)


def causal_is_enough(cfg, length: int) -> bool:
    """Whether every attention layer of a text config, over `length` unpadded tokens, masks nothing but the
    future: full attention, or a sliding window no shorter than the sequence (chunked, linear or other layer
    kinds: no)."""
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return False
    window = getattr(cfg, "sliding_window", None)
    return "sliding_attention" not in kinds if window is None else length <= window


def _refuse_a_mask(module, args, kwargs):
    if kwargs.get("attention_mask") is not None or (len(args) > 1 and args[1] is not None):
        raise ValueError(_NO_MASK)


@contextmanager
def causal_attention(stack: nn.Module, length: int):
    """Within this scope the decoder stack's attention layers run sdpa with no mask, and transformers builds none.

    For a pass without an attention mask or cache, transformers checks the position ids for packed sequences on
    every forward, and that check waits for the device (`masking_utils.find_packed_sequence_indices`, 5.17–5.25).
    It builds masks only for the attention implementations it has a mask function for, so under an implementation
    registered through its `AttentionInterface` (here: sdpa itself) there is neither mask nor check, and the host
    can queue the whole step. transformers would drop a padding mask given to such a stack, so within the scope
    the stack and its layers refuse one. Only a stack on plain sdpa whose layers need no more than causality over
    `length` tokens is switched (`causal_is_enough`); the previous setting comes back on exit. The vision tower
    keeps its own. Gradient checkpointing recomputes layers after the scope, under plain sdpa: the same call
    (no mask, causal), though `--compile` then compiles each layer's graph once more."""
    cfg = stack.config
    prev = cfg._attn_implementation
    if prev != "sdpa" or not causal_is_enough(cfg, length):
        yield
        return
    hook = stack.register_forward_pre_hook(_refuse_a_mask, with_kwargs=True)
    cfg._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        cfg._attn_implementation = prev
        hook.remove()


def _stack_pass(model: nn.Module, input_ids: Tensor, feats: Tensor | None) -> Tensor:
    """The decoder stack's last hidden states over the embedded batch, without a mask (see DistillStep)."""
    stack = decoder_stack(model)
    with causal_attention(stack, input_ids.shape[1]):
        return stack(inputs_embeds=embed(model, input_ids, feats), attention_mask=None,
                     use_cache=False).last_hidden_state


class DistillStep(nn.Module):
    """Teacher pass + student pass + teacher-forced layer outputs for one micro-batch.

    forward(...) returns a dict of float32 scalars:
      prob_sum: Σ over real tokens of T²·KL;  layer_sum: Σ over Mamba layers and real tokens of
      ‖T_l − S_l‖₂ (its square under loss_reduction="sum", kept per layer in layer_sq);
      ce_sum: Σ over answer targets of the CE;  and the counts n_tokens, n_answer.
    """

    def __init__(self, model: nn.Module, teacher: TeacherSwap, temperature: float, need_ce: bool,
                 need_layer: bool, need_prob: bool):
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.teacher_modules = nn.ModuleList([t for _, _, t in teacher.swaps])   # moved with .to()
        self.temperature = temperature
        self.need_ce, self.need_layer, self.need_prob = need_ce, need_layer, need_prob

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor,
                pixel_values: Tensor | None = None, rows: Tensor | None = None) -> dict[str, Tensor]:
        """attention_mask: 1 on tokens, 0 on right padding (as `inputs.data.collate` pads; the loop checks it
        on the host, `require_right_padding`). In a causal model no real token attends to the pads after it,
        so both passes run without the mask: attention takes its causal kernel instead of a materialised
        (B, 1, T, T) mask, and transformers makes no check that waits for the device (`causal_attention`).
        The mask picks the real tokens for the losses.
        rows: optional flat indices of attention_mask's real positions (see `losses.head_losses`)."""
        if not attention_mask.is_cuda:                # on a GPU this would wait for the device
            require_right_padding(attention_mask)
        model = self.model
        mamba = model.hybrid_config.mamba_layers
        mask = attention_mask.bool()
        with torch.no_grad():
            feats = vision_features(model, pixel_values) if pixel_values is not None else None
        captured: dict = {}
        t_hidden = t_head = None
        if self.need_prob or self.need_layer:
            # Inside `active()` the decoder stack, its layers and the connector resolve to the teacher's.
            with torch.no_grad(), self.teacher.active(), \
                    capture_layers(model, mamba if self.need_layer else [], captured):
                t_hidden = _stack_pass(model, input_ids, feats)
                t_head = model.get_output_embeddings()
        out = {"n_tokens": mask.sum().float(), "n_answer": losses.answer_mask(labels).logical_and(mask).sum().float()}
        zero = torch.zeros((), device=input_ids.device)
        out["prob_sum"] = out["ce_sum"] = out["layer_sum"] = zero
        out["layer_sq"] = torch.zeros(len(mamba), device=input_ids.device)
        if self.need_prob or self.need_ce:
            s_hidden = _stack_pass(model, input_ids, feats)
            # the LM head and both losses in chunks of real tokens: no (B, T, V) logits (losses.head_losses)
            kl, ce = losses.head_losses(s_hidden, t_hidden, model.get_output_embeddings(), t_head, labels, mask,
                                        self.temperature, want_kl=self.need_prob, want_ce=self.need_ce, rows=rows)
            out["prob_sum"], out["ce_sum"] = (kl if self.need_prob else zero), (ce if self.need_ce else zero)
        if self.need_layer:
            layers = decoder_layers(model)
            sums, sqs = [], []
            for i in mamba:
                h_in, h_out = captured[i]
                s_out = layers[i](h_in, attention_mask=None)
                s_out = s_out[0] if isinstance(s_out, tuple) else s_out
                sums.append(losses.reduce_sum(losses.layer_distance_per_token(s_out, h_out), mask))
                sqs.append(losses.reduce_sum(losses.layer_sq_distance_per_token(s_out, h_out), mask))
            out["layer_sum"] = torch.stack(sums).sum()
            out["layer_sq"] = torch.stack(sqs)
        return out
