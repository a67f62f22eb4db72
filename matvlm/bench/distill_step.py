"""One distillation step at TinyLLaVA-3.1B size (random weights) on a CUDA GPU.

    matvlm bench-distill-step --out DIR [--micro 4] [--seq 1300]
    torchrun --nproc-per-node N -m matvlm bench-distill-step --ddp [--accum 4] --out DIR   (DDP scaling)

Model: Phi-2 shapes (32 layers, d 2560, 32 heads, MLP 10240, vocab 51200) + SigLIP-so400m-384
tower (27 layers, d 1152, patch 14) + 2-layer GELU connector; 25 % Mamba layers (0, 4, ..., 28).
Samples: `seq` tokens, of which 728 are image tokens (TinyLLaVA's count), 150 answer tokens.

Compares matvlm's step (one copy of the frozen weights; teacher pass = the same module tree with
the original attention and a frozen connector swapped in; vision tower once) with the
straightforward one (a separate frozen teacher model and a separate student model, each run
through transformers' forward). Reports tokens/s, model FLOPs utilisation against the measured
bf16 matmul rate, and peak memory; writes distill_step.json.
"""

from __future__ import annotations

import copy

import torch

from .kernels import timed


def tinyllava_config():
    from transformers import AutoConfig, LlavaConfig, SiglipVisionConfig

    text = AutoConfig.for_model("phi", vocab_size=51200, hidden_size=2560, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, intermediate_size=10240,
                                partial_rotary_factor=0.4, max_position_embeddings=32768, resid_pdrop=0.0,
                                embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                num_attention_heads=16, image_size=384, patch_size=14)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=50296, projector_hidden_act="gelu",
                      vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=728,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    return cfg


def random_teacher(cfg):
    from transformers import LlavaForConditionalGeneration

    from ..model.hybrid import hybrid_config_for, make_hybrid

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration(cfg)
    model.to(torch.bfloat16).eval()
    make_hybrid(model, hybrid_config_for(model, []))
    return model


def make_batch(micro: int, seq: int, image_token_id: int, n_img: int = 728, n_answer: int = 150):
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 50000, (micro, seq), device="cuda", generator=g)
    ids[:, 1:1 + n_img] = image_token_id
    labels = torch.full_like(ids, -100)
    labels[:, -n_answer:] = ids[:, -n_answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(micro, 3, 384, 384, device="cuda", generator=g, dtype=torch.bfloat16)}


def model_flops(cfg, mamba_layers: int, micro: int, seq: int) -> float:
    """Matmul FLOPs of one micro-batch: teacher forward, student forward + backward (activation grads
    through every layer, weight grads of the mixers and connector), the teacher-forced student Mamba
    layers (forward + backward), and the vision tower once. Causal attention scores count 2*T^2*d per layer."""
    t, v = cfg.text_config, cfg.vision_config
    d, L, ff, V = t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.vocab_size
    n = micro * seq
    attn_proj, mlp = 4 * d * d, 2 * d * ff
    mamba_proj = d * (2 * d + 2 * d + t.num_attention_heads) + d * d
    scores = 2 * seq * d                                        # per token per attention layer (causal half)
    teacher_fwd = 2 * n * (L * (attn_proj + mlp) + d * V) + 2 * n * L * scores
    a = L - mamba_layers
    student_fwd = 2 * n * (a * (attn_proj + mlp) + mamba_layers * (mamba_proj + mlp) + d * V) + 2 * n * a * scores
    student_bwd_act = student_fwd
    student_bwd_w = 2 * n * mamba_layers * mamba_proj
    layer_runs = 3 * 2 * n * mamba_layers * (mamba_proj + mlp)
    dv, vl, vff, vt = v.hidden_size, v.num_hidden_layers, v.intermediate_size, (v.image_size // v.patch_size) ** 2
    vision = 2 * micro * vt * vl * (4 * dv * dv + 2 * dv * vff) + 2 * micro * vl * 2 * vt * vt * dv
    connector = 2 * micro * 728 * (dv * d + d * d) * 3
    return float(teacher_fwd + student_fwd + student_bwd_act + student_bwd_w + layer_runs + vision + connector)


def one_copy(cfg, micro, seq, gradient_checkpointing=False):
    from ..distill.model import DistillStep, build
    from ..distill.train import enable_checkpointing

    teacher = random_teacher(cfg)
    model, swaps, names = build(teacher, mamba_ratio=0.25, seed=0)
    if gradient_checkpointing:
        enable_checkpointing(model)
    step = DistillStep(model, swaps, 1.0, need_ce=True, need_layer=True, need_prob=True).cuda().train()
    params = [p for n, p in model.named_parameters() if n in set(names)]
    return step, params


class TwoCopyStep(torch.nn.Module):
    """The straightforward step: separate teacher and student models, each through transformers' forward."""

    def __init__(self, teacher, student):
        super().__init__()
        self.teacher, self.student = teacher, student

    def forward(self, input_ids, attention_mask, labels, pixel_values):
        from ..distill import losses
        from ..distill.model import capture_layers
        from ..model.hybrid import decoder_layers

        mamba = self.student.hybrid_config.mamba_layers
        captured = {}
        with torch.no_grad(), capture_layers(self.teacher, mamba, captured):
            t_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask,
                                    pixel_values=pixel_values).logits
        s_logits = self.student(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
        mask = attention_mask.bool()
        prob = losses.reduce_sum(losses.kl_per_token(s_logits, t_logits), mask)
        layer = 0.0
        for i in mamba:
            h_in, h_out = captured[i]
            out = decoder_layers(self.student)[i](h_in, mamba_padding_mask=attention_mask)
            layer = layer + losses.reduce_sum(losses.layer_distance_per_token(out, h_out), mask)
        return {"prob_sum": prob, "layer_sum": layer, "n_tokens": mask.sum().float()}


def two_copies(cfg, micro, seq):
    from ..convert.init import hybridize
    from ..convert.layers import select_layers

    teacher = random_teacher(cfg)
    student = copy.deepcopy(teacher)
    hybridize(student, select_layers(32, 0.25))
    teacher.requires_grad_(False)
    student.requires_grad_(False)
    trainable = list(student.mamba_mixers.values()) + [student.model.multi_modal_projector]
    for m in trainable:
        m.float().requires_grad_(True)
    params = [p for m in trainable for p in m.parameters()]
    return TwoCopyStep(teacher, student).cuda().train(), params


def measure(name, build_fn, cfg, micro, seq, peak_tflops, **kw):
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step, params = build_fn(cfg, micro, seq, **kw)
        opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
        batch = make_batch(micro, seq, cfg.image_token_id)

        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = step(**batch)
                loss = (o["layer_sum"] + o["prob_sum"]) / o["n_tokens"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = timed(one, warmup=2, rep=5)
        peak = torch.cuda.max_memory_allocated() / 2**30
        tokens = micro * seq
        flops = model_flops(cfg, 8, micro, seq)
        res = {"name": name, "micro": micro, "seq": seq, "step_ms": ms, "tokens_per_s": tokens / (ms / 1e3),
               "samples_per_s": micro / (ms / 1e3), "model_TFLOP_per_step": flops / 1e12,
               "mfu": flops / (ms / 1e3) / (peak_tflops * 1e12), "peak_mem_GiB": peak, **kw}
    except torch.OutOfMemoryError:
        res = {"name": name, "micro": micro, "seq": seq, "oom": True, **kw}
    return res                      # the models die with this frame


def ddp_scaling(cfg, micro: int, seq: int, accum: int, peak_tflops: float) -> dict | None:
    """One optimizer step of `accum` micro-batches per process under DistributedDataParallel (NCCL),
    gradients all-reduced once per step as matvlm's loop does (no_sync on the other micro-batches).
    Launched by torchrun; every rank measures, rank 0 returns the record (others None)."""
    import contextlib
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    step, params = one_copy(cfg, micro, seq)
    ddp = DDP(step, device_ids=[local])
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    batch = make_batch(micro, seq, cfg.image_token_id)

    def one():
        for i in range(accum):
            sync = contextlib.nullcontext() if i == accum - 1 else ddp.no_sync()
            with sync, torch.autocast("cuda", dtype=torch.bfloat16):
                o = ddp(**batch)
                loss = (o["layer_sum"] + o["prob_sum"]) / o["n_tokens"] / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    ms = timed(one, warmup=1, rep=3)
    times = [None] * world
    dist.all_gather_object(times, ms)
    peak = torch.cuda.max_memory_allocated() / 2**30
    grad_bytes = sum(p.numel() for p in params) * 4
    dist.destroy_process_group()
    if rank != 0:
        return None
    step_ms = max(times)
    tokens = world * accum * micro * seq
    flops = model_flops(cfg, 8, micro, seq) * accum * world
    return {"name": f"DDP x{world}", "world": world, "micro": micro, "accum": accum, "seq": seq,
            "step_ms": step_ms, "rank_ms": times, "tokens_per_s": tokens / (step_ms / 1e3),
            "tokens_per_s_per_gpu": tokens / world / (step_ms / 1e3),
            "mfu": flops / (step_ms / 1e3) / (world * peak_tflops * 1e12), "peak_mem_GiB": peak,
            "allreduce_GB_per_step": grad_bytes / 1e9}
