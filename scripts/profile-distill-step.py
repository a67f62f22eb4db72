"""Where a small model's distillation step spends its time (issue 16): SmolLM2-135M shapes, random weights.

    python scripts/profile-distill-step.py --config DIR [--ratio 0.25] [--micro 16,32,64] [--seq 1024]
        [--compile norm,mlp | --compile layer] --out DIR

DIR is any causal-LM directory with a config.json (only the config is read; weights are random). For each
micro-batch size it times one optimizer step of matvlm's DistillStep (teacher pass, student pass, chunked
LM-head KL, layer loss; backward, clip, AdamW) with CUDA events, reports tokens/s, model FLOPs
utilisation against the measured bf16 matmul rate and peak memory, and profiles the first size's step
(the top CUDA kernels by time, and every wait of the host for the device inside it, from torch's sync
debug mode: `host_waits`). Writes profile-distill-step.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def text_flops(cfg, n_mamba: int, micro: int, seq: int) -> float:
    """Matmul FLOPs of one micro-batch of a text model: teacher forward, student forward, its backward
    (activation grads through every layer, weight grads of the mixers), the layer-loss runs of the Mamba
    layers (forward + backward) and the LM head (teacher, student, student's input gradient)."""
    d, L, ff, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    h, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = d // h
    n = micro * seq
    attn = d * (h * hd) * 2 + d * (kv * hd) * 2            # q, o + k, v
    mlp = 3 * d * ff                                        # gate, up, down
    mamba = d * (2 * h * hd + 2 * h * hd + h) + h * hd * d  # in_proj (z, x, B, C, dt) + out_proj
    scores = 2 * seq * h * hd                               # per token per attention layer (causal half)
    a = L - n_mamba
    teacher = 2 * n * L * (attn + mlp) + 2 * n * L * scores
    student = 2 * n * (a * (attn + mlp) + n_mamba * (mamba + mlp)) + 2 * n * a * scores
    head = 3 * 2 * n * d * V
    return float(teacher + 2 * student + 2 * n * n_mamba * mamba + 3 * 2 * n * n_mamba * (mamba + mlp) + head)


def compile_parts(model, step, cfg, parts: list[str], seq: int) -> dict:
    """torch.compile the decoder layers' `parts` (norm: input/post-attention RMSNorms and the final norm;
    mlp: the MLPs; layer: what `distill --compile` compiles, `distill.train.compile_layers`: each attention
    layer whole, and a Mamba layer's norms and MLP) in place, after one eager forward; returns the largest
    relative difference of the step's losses, compiled against eager, on the same batch (the compiled step
    must compute the same thing)."""
    from matvlm.model.hybrid import decoder_layers

    unknown = set(parts) - {"norm", "mlp", "layer"}
    if unknown or ("layer" in parts and len(parts) > 1):
        raise SystemExit(f"--compile takes norm and/or mlp, or layer alone; got {','.join(parts)}")
    g = torch.Generator(device="cuda").manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, seq), device="cuda", generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def losses():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            o = step(**batch)
        return {k: o[k].double() for k in ("prob_sum", "layer_sum")}

    eager = losses()
    n = 0
    if "layer" in parts:
        from matvlm.distill.train import compile_layers

        n = compile_layers(model)
    for layer in decoder_layers(model) if "layer" not in parts else []:
        for name in (["input_layernorm", "post_attention_layernorm"] if "norm" in parts else []) + \
                (["mlp"] if "mlp" in parts else []):
            getattr(layer, name).compile(dynamic=True)
            n += 1
    if "norm" in parts or "layer" in parts:
        model.model.norm.compile(dynamic=True)
        n += 1
    compiled = losses()
    return {"compiled_modules": n, "max_rel_diff_vs_eager": max(
        float((compiled[k] - eager[k]).abs() / eager[k].abs().clamp_min(1e-12)) for k in eager)}


def host_waits(fn) -> dict:
    """The operations inside one call of `fn` that made the host wait for the device, as torch's sync debug
    mode reports them (a warning each, with where it came from)."""
    import warnings

    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(prev)
    waits = [w for w in caught if "synchroniz" in str(w.message)]
    where = [f"{w.filename}:{w.lineno}" for w in waits]
    return {"count": len(waits), "where": sorted(set(where))[:20]}


def main(argv=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from matvlm.bench.kernels import ceilings, timed
    from matvlm.distill.model import DistillStep, build
    from matvlm.model.hybrid import hybrid_config_for, make_hybrid

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--micro", default="16,32,64")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--compile", default="", help="torch.compile these submodules of every decoder layer before "
                    "timing, comma-separated: norm (the RMSNorms), mlp; or layer (as distill --compile: attention layers "
                    "whole, Mamba layers' norms and MLPs); the losses are checked against eager first")
    args = ap.parse_args(argv)

    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "ceilings": ceilings(),
           "ratio": args.ratio, "seq": args.seq, "runs": []}
    peak = res["ceilings"]["bf16_matmul_TFLOPs"]
    cfg = AutoConfig.from_pretrained(args.config)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        teacher = AutoModelForCausalLM.from_config(cfg)
    teacher.to(torch.bfloat16).eval()
    make_hybrid(teacher, hybrid_config_for(teacher, []))
    model, swaps, names = build(teacher, mamba_ratio=args.ratio, seed=0)
    step = DistillStep(model, swaps, 1.0, need_ce=False, need_layer=True, need_prob=True).cuda().train()
    params = [p for n, p in model.named_parameters() if n in set(names)]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), weight_decay=0.01)
    n_mamba = len(model.hybrid_config.mamba_layers)

    res["compile"] = args.compile
    if args.compile:
        res["compile_check"] = compile_parts(model, step, cfg, args.compile.split(","), args.seq)
        print(json.dumps(res["compile_check"]), flush=True)

    for k, micro in enumerate(int(m) for m in args.micro.split(",")):
        g = torch.Generator(device="cuda").manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (micro, args.seq), device="cuda", generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                 # the real tokens' rows, given as the loop gives them: no nonzero() waiting for the device
                 "rows": torch.arange(micro * args.seq, device="cuda")}

        def one():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                o = step(**batch)
                loss = (0.01 * o["layer_sum"] + o["prob_sum"]) / o["n_tokens"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        try:
            ms = timed(one, warmup=3, rep=7)
        except torch.OutOfMemoryError:
            res["runs"].append({"micro": micro, "oom": True})
            print(json.dumps(res["runs"][-1]), flush=True)
            continue
        flops = text_flops(cfg, n_mamba, micro, args.seq)
        # the host's share: how long Python takes to issue one step (no wait for the device at the end);
        # near step_ms means the step is bound by the host, not by the GPU
        issue = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            one()
            issue.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        r = {"micro": micro, "step_ms": ms, "host_issue_ms": sorted(issue)[2],
             "tokens_per_s": micro * args.seq / (ms / 1e3),
             "mfu": flops / (ms / 1e3) / (peak * 1e12), "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
        res["runs"].append(r)
        print(json.dumps(r), flush=True)
        if k == 0:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                one()
                torch.cuda.synchronize()
            avg = prof.key_averages()
            table = avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
            print(table, flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "profile-distill-step.txt").write_text(table)
            # where the host's time goes (the profiler adds its own per-op cost to these)
            (args.out / "profile-distill-step-cpu.txt").write_text(
                avg.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=70))
            r["profiled_cuda_ms"] = sum(e.self_device_time_total for e in avg) / 1e3
            r["profiled_ops"] = sum(e.count for e in avg if e.key.startswith("aten::"))
            r["host_waits"] = host_waits(one)
            print(json.dumps({"host_waits": r["host_waits"]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-distill-step.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
