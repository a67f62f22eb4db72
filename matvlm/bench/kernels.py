"""GPU check and timing of the Mamba-2 kernels at TinyLLaVA size (run on a CUDA machine).

    matvlm bench-kernels --out results/ [--lengths 1024,4096,16384] [--only-decode]

1. Device ceilings: device-to-device copy bandwidth (bytes read + written) and bf16 matmul rate.
2. Correctness: the Triton path (mamba_ssm kernels) against the float64 reference on fresh random
   bf16 inputs, forward (y, final state) and backward (all input gradients), per length; the decode
   step and the gated norm likewise.
3. Timing (medians of CUDA-event timings after warm-up): prefill of one Mamba2Mixer vs one sdpa
   attention layer of the same size (Phi-2: d_model 2560, 32 heads x 80), and one decode step of the
   mixer captured in a CUDA graph, against its memory-bandwidth roofline.
Writes kernels.json and prints a markdown table.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F


@contextmanager
def kernels_env(value: str):
    """MATVLM_KERNELS set to `value` inside the block, and as it was (or unset) after it."""
    before = os.environ.get("MATVLM_KERNELS")
    os.environ["MATVLM_KERNELS"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MATVLM_KERNELS")
        else:
            os.environ["MATVLM_KERNELS"] = before


def finish_check(res: dict, out: str | Path, ok: bool) -> None:
    """End a kernel-check script (scripts/*-kernel-check.py): print `res` as JSON, write it to `out`, and exit
    1 when the check failed."""
    import sys

    print(json.dumps(res, indent=1))
    Path(out).write_text(json.dumps(res, indent=1))
    sys.exit(0 if ok else 1)


def timed(fn, warmup: int = 5, rep: int = 30) -> float:
    """Median milliseconds of fn() over `rep` runs, timed with CUDA events after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def ceilings() -> dict:
    n = 1 << 30                                                        # 1 GiB of bf16 per buffer
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), rep=20)
    bw = 2 * src.numel() * 2 / (ms / 1e3)
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms_mm = timed(lambda: a @ b, rep=10)
    return {"copy_GBps": bw / 1e9, "bf16_matmul_TFLOPs": 2 * 8192**3 / (ms_mm / 1e3) / 1e12}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def scan_inputs(T: int, H=32, P=80, G=32, N=80, B=1, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, device="cuda", generator=g).to(dt)
    x, Bm, C = r(B, T, H, P), r(B, T, G, N) / math.sqrt(N), r(B, T, G, N) / math.sqrt(N)
    dt = F.softplus(torch.randn(B, T, H, device="cuda", generator=g) - 3.0)          # ~0.05, like dt_bias init
    A = -torch.exp(torch.rand(H, device="cuda", generator=g) * math.log(16))
    D = torch.randn(H, device="cuda", generator=g)
    s0 = torch.randn(B, H, P, N, device="cuda", generator=g) * 0.1
    return x, dt, A, Bm, C, D, s0


def check_scan(T: int) -> dict:
    from matvlm.ops import ssd_ref, ssd_triton

    inputs = scan_inputs(T, seed=T)
    wy = torch.randn(1, T, 32, 80, device="cuda")
    wf = torch.randn(1, 32, 80, 80, device="cuda")

    def run(fn, leaves):
        y, f = fn(*leaves)
        ((y.float() * wy).sum() + (f.float() * wf).sum()).backward()
        return y.detach(), f.detach(), [l.grad for l in leaves]

    tr_leaves = [t.clone().requires_grad_(True) for t in inputs]
    y_t, f_t, g_t = run(lambda *a: ssd_triton.ssd(*a, chunk_size=256), tr_leaves)
    ref_leaves = [t.double().clone().requires_grad_(True) for t in inputs]
    y_r, f_r, g_r = run(lambda *a: ssd_ref.ssd_chunked(*a, chunk_size=64), ref_leaves)
    out = {"T": T, "y": rel(y_t, y_r), "final_state": rel(f_t, f_r)}
    for name, a, b in zip(["dx", "ddt", "dA", "dB", "dC", "dD", "dstate0"], g_t, g_r):
        out[name] = rel(a, b)
    del ref_leaves, g_r, y_r
    torch.cuda.empty_cache()
    return out


def check_step_and_norm() -> dict:
    from matvlm.ops import ssd_ref, ssd_triton

    g = torch.Generator(device="cuda").manual_seed(7)
    H, P, N, B = 32, 80, 80, 4
    state = torch.randn(B, H, P, N, device="cuda", generator=g)
    x = torch.randn(B, H, P, device="cuda", generator=g).bfloat16()
    dt = F.softplus(torch.randn(B, H, device="cuda", generator=g) - 3)
    A = -torch.exp(torch.rand(H, device="cuda", generator=g) * math.log(16))
    Bm = torch.randn(B, H, N, device="cuda", generator=g).bfloat16()
    C = torch.randn(B, H, N, device="cuda", generator=g).bfloat16()
    D = torch.randn(H, device="cuda", generator=g)
    s_t, s_r = state.clone(), state.double()
    y_t = ssd_triton.ssd_step(s_t, x, dt, A, Bm, C, D)
    y_r = ssd_ref.ssd_step(s_r, x.double(), dt.double(), A.double(), Bm.double(), C.double(), D.double())
    y = torch.randn(2, 64, 2560, device="cuda", generator=g).bfloat16()
    z = torch.randn(2, 64, 2560, device="cuda", generator=g).bfloat16()
    w = torch.randn(2560, device="cuda", generator=g)
    n_t = ssd_triton.gated_rmsnorm(y, z, w.bfloat16(), 1e-5, 80)
    n_r = ssd_ref.gated_rmsnorm_ref(y.double(), z.double(), w.double(), 1e-5, 80)
    return {"step_y": rel(y_t, y_r), "step_state": rel(s_t, s_r), "gated_norm": rel(n_t, n_r)}


def rotary_inputs(bsz: int, heads: int, kv: int, d: int, rdim: int, generator=None, device="cuda"):
    """A random attention projection qkv (B, (H + 2 KV) D) and the cos, sin (B, rdim) of random angles,
    all bf16: the inputs of `rope_kv` and `attend_step`."""
    qkv = torch.randn(bsz, (heads + 2 * kv) * d, device=device, generator=generator).bfloat16()
    ang = torch.rand(bsz, rdim // 2, device=device, generator=generator) * 6.3
    return qkv, torch.cat([ang.cos(), ang.cos()], -1).bfloat16(), torch.cat([ang.sin(), ang.sin()], -1).bfloat16()


def attention_f64(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, n_keys: int,
                  scale: float) -> torch.Tensor:
    """The float64 reference of one-query attention: q (B, H, D) over the first n_keys positions of
    keys, values (B, KV, L, D) (H a multiple of KV) where mask (B, L) is True."""
    group = q.shape[1] // keys.shape[1]
    kr = keys[:, :, :n_keys].double().repeat_interleave(group, 1)
    vr = values[:, :, :n_keys].double().repeat_interleave(group, 1)
    s = torch.einsum("bhd,bhld->bhl", q.double(), kr) * scale
    s = s.masked_fill(~mask[:, None, :n_keys], float("-inf"))
    return torch.einsum("bhl,bhld->bhd", s.softmax(-1), vr)


def check_decode_kernels() -> dict:
    """The decode step's Triton kernels (`ops.gemv_triton`, `ops.attention_triton`, `ops.mamba_decode_triton`) against float64 on fresh random inputs:
    the matrix-vector product for 1-16 rows (TinyLLaVA's fused shapes and ragged ones, with and without
    bias and residual), and split-KV attention (MHA and GQA, ragged masks, unread keys past n_keys
    filled with NaN, which must not leak into the output)."""
    from matvlm.ops import attention_triton as at, gemv_triton as gt, mamba_decode_triton as mt

    g = torch.Generator(device="cuda").manual_seed(11)
    out = {"gemv": [], "attention": []}
    for m, n, k in [(1, 17920, 2560), (1, 2560, 12800), (1, 51200, 2560), (1, 1000, 300), (3, 20512, 2560),
                    (8, 2560, 12800), (16, 777, 1030)]:
        x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(n, k, device="cuda", generator=g) / math.sqrt(k)).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16()
        r = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        plain = gt.gemv(x, w)
        full = gt.gemv(x, w, b, r)
        ref = x.double() @ w.double().T
        out["gemv"].append({"shape": [m, n, k], "plain": rel(plain, ref), "bias_residual": rel(full, ref + b.double() + r.double())})
    from matvlm import ops

    for m, k1, n, act, kind, out_act in [(1, 2560, 2560, "gelu_tanh", "layer", None),
                                         (5, 2560, 2560, "gelu_tanh", "layer", None),
                                         (1, 0, 2560, "silu_mul", "rms", None), (8, 0, 2560, "silu_mul", "rms", None),
                                         (1, 2560, 7680, None, "rms", None), (4, 2560, 7680, None, "layer", None),
                                         (1, 2560, 17920, None, "layer", "gelu_tanh"),
                                         (3, 2560, 20512, None, "layer", "gelu"), (1, 2560, 2560, None, None, None),
                                         (2, 2560, 2560, None, None, None)]:
        kt = 0 if act is None and (kind or out_act) else 10240
        x = torch.randn(m, 2560, device="cuda", generator=g).bfloat16() * 3 + 1 if k1 else None
        tail = (torch.randn(m, kt * (2 if act == "silu_mul" else 1), device="cuda", generator=g).bfloat16()
                if kt else None)
        w = (torch.randn(n, k1 + kt, device="cuda", generator=g) / math.sqrt(k1 + kt)).bfloat16()
        b = torch.randn(n, device="cuda", generator=g).bfloat16()
        r = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        nw = torch.randn(2560, device="cuda", generator=g).bfloat16()
        nb = torch.randn(2560, device="cuda", generator=g).bfloat16() if kind == "layer" else None
        split = 7680 if out_act else 0
        got = gt.gemv(x, w, b, r, tail, nw, nb, 1e-5, gt.NORMS[kind if k1 else None], gt.ACTS[act], gt.ACTS[out_act],
                      split)
        d64 = (lambda t: t.double() if t is not None else None)
        ref = ops.linear(d64(x), w.double(), b.double(), r.double(), tail=d64(tail), act=act,
                         norm=(kind, nw.double(), d64(nb), 1e-5) if k1 and kind else None, out_act=out_act,
                         out_act_from=split)
        out["gemv"].append({"shape": [m, n, k1, kt], "norm": kind if k1 else None, "act": act, "out_act": out_act,
                            "rel": rel(got, ref)})
    for bsz, heads, kv, d, rdim in [(1, 32, 32, 80, 32), (3, 32, 8, 128, 128)]:
        qkv, cos, sin = rotary_inputs(bsz, heads, kv, d, rdim, g)
        caches = [torch.randn(bsz, kv, 64, d, device="cuda", generator=g).bfloat16() for _ in range(2)]
        slot = torch.tensor(37, device="cuda")
        refs = [c.double() for c in caches]
        q = ops.rope_kv(qkv, cos, sin, caches[0], caches[1], slot, heads)
        q_ref = ops.rope_kv(qkv.double(), cos.double(), sin.double(), refs[0], refs[1], slot, heads)
        out["attention"].append({"rope_kv": [bsz, heads, kv, d, rdim], "q": rel(q, q_ref), "k": rel(caches[0], refs[0]),
                                 "v": rel(caches[1], refs[1])})
    for bsz, heads, kv, d, length, n_keys in [(1, 32, 32, 80, 1280, 1100), (3, 32, 8, 128, 4352, 4001),
                                              (2, 8, 8, 64, 200, 13)]:
        q = torch.randn(bsz, heads, d, device="cuda", generator=g).bfloat16()
        keys = torch.randn(bsz, kv, length, d, device="cuda", generator=g).bfloat16()
        values = torch.randn(bsz, kv, length, d, device="cuda", generator=g).bfloat16()
        keys[:, :, n_keys:] = float("nan")
        values[:, :, n_keys:] = float("nan")
        mask = torch.rand(bsz, length, device="cuda", generator=g) < 0.8
        mask[:, n_keys:] = False
        mask[:, n_keys - 1] = True
        scale = d ** -0.5
        ref = attention_f64(q, keys, values, mask, n_keys, scale)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for plan in (None, {"split_len": 256, "block_l": 64, "warps": 4}):
            got = at.launch_attention(q, keys, values, mask, torch.tensor(n_keys, device="cuda"), scale, sms, plan)
            out["attention"].append({"shape": [bsz, heads, kv, d, length, n_keys], "plan": plan or "default",
                                     "rel": rel(got, ref)})
    for bsz, heads, kv, d, rdim, length, slot in [(1, 32, 32, 80, 32, 4352, 4000), (1, 32, 8, 128, 128, 1280, 1023),
                                                  (2, 8, 8, 64, 64, 200, 13)]:
        qkv, cos, sin = rotary_inputs(bsz, heads, kv, d, rdim, g)
        caches = [torch.randn(bsz, kv, length, d, device="cuda", generator=g).bfloat16() for _ in range(2)]
        mask = torch.rand(bsz, length, device="cuda", generator=g) < 0.8
        mask[:, slot:] = False
        mask[:, slot] = True
        refs = [c.double() for c in caches]
        for c in caches:
            c[:, :, slot:] = float("nan")                       # written at the slot, never read from it on
        got = at.attend_step(qkv, cos, sin, caches[0], caches[1], mask, torch.tensor(slot, device="cuda"), heads,
                             d ** -0.5)
        q = ops.rope_kv(qkv.double(), cos.double(), sin.double(), refs[0], refs[1],
                        torch.tensor(slot, device="cuda"), heads)
        ref = attention_f64(q, refs[0], refs[1], mask, slot + 1, d ** -0.5)
        out["attention"].append({"attend_step": [bsz, heads, kv, d, rdim, length, slot], "rel": rel(got, ref),
                                 "k_written": rel(caches[0][:, :, slot], refs[0][:, :, slot]),
                                 "v_written": rel(caches[1][:, :, slot], refs[1][:, :, slot])})
    # the continuous batcher's slots: 16 rows of one buffer, each at its own position, reading only its own keys
    bsz, heads, d, rdim, length = 16, 32, 80, 32, 2048
    slots = torch.randint(0, length, (bsz,), device="cuda", generator=g)
    qkv, cos, sin = rotary_inputs(bsz, heads, heads, d, rdim, g)
    caches = [torch.randn(bsz, heads, length, d, device="cuda", generator=g).bfloat16() for _ in range(2)]
    beyond = torch.arange(length, device="cuda")[None] >= slots[:, None]
    mask = (torch.rand(bsz, length, device="cuda", generator=g) < 0.8) & ~beyond
    mask[torch.arange(bsz, device="cuda"), slots] = True
    refs = [c.double() for c in caches]
    for c in caches:
        c.masked_fill_(beyond[:, None, :, None], float("nan"))
    got = at.attend_step(qkv, cos, sin, caches[0], caches[1], mask, slots, heads, d ** -0.5)
    q = ops.rope_kv(qkv.double(), cos.double(), sin.double(), refs[0], refs[1], slots, heads)
    ref = torch.cat([attention_f64(q[r:r + 1], refs[0][r:r + 1], refs[1][r:r + 1], mask[r:r + 1], int(s) + 1,
                                   d ** -0.5) for r, s in enumerate(slots.tolist())])
    at_slot = torch.arange(bsz, device="cuda"), slice(None), slots
    out["attention"].append({"attend_step_per_row": [bsz, heads, heads, d, rdim, length], "rel": rel(got, ref),
                             "k_written": rel(caches[0][at_slot], refs[0][at_slot]),
                             "v_written": rel(caches[1][at_slot], refs[1][at_slot])})
    for bsz, heads, groups, p, n in [(1, 32, 32, 80, 80), (4, 32, 8, 64, 128)]:
        di, gn = heads * p, groups * n
        conv_w = torch.randn(di + 2 * gn, 4, device="cuda", generator=g).bfloat16() * 0.5
        conv_b = torch.randn(di + 2 * gn, device="cuda", generator=g).bfloat16()
        dt_bias = torch.randn(heads, device="cuda", generator=g) - 3
        a_log = torch.rand(heads, device="cuda", generator=g) * 2.7
        d_skip = torch.randn(heads, device="cuda", generator=g)
        norm_w = torch.randn(di, device="cuda", generator=g).bfloat16()
        states = [torch.randn(bsz, di + 2 * gn, 3, device="cuda", generator=g).bfloat16(),
                  torch.randn(bsz, heads, p, n, device="cuda", generator=g)]
        refs = [t.double() for t in states]
        worst = {"y": 0.0, "conv_state": 0.0, "ssm_state": 0.0}
        for _ in range(3):
            zxbcdt = torch.randn(bsz, 2 * di + 2 * gn + heads, device="cuda", generator=g).bfloat16()
            got = mt.mamba_step(zxbcdt, *states, conv_w, conv_b, dt_bias, a_log, d_skip, norm_w, 1e-5, groups)
            with kernels_env("torch"):                          # the float64 reference throughout
                want = ops.mamba_step(zxbcdt.double(), *refs, conv_w.double(), conv_b.double(), dt_bias.double(),
                                      a_log.double(), d_skip.double(), norm_w.double(), 1e-5, groups)
            worst = {"y": max(worst["y"], rel(got, want)), "conv_state": max(worst["conv_state"], rel(states[0], refs[0])),
                     "ssm_state": max(worst["ssm_state"], rel(states[1], refs[1]))}
        out["mamba_step"] = out.get("mamba_step", []) + [{"shape": [bsz, heads, groups, p, n], **worst}]
    return out


def phi2_mixer():
    from matvlm.config import HybridConfig
    from matvlm.model.mixer import Mamba2Mixer

    cfg = HybridConfig(n_layer=1, mamba_layers=[0], d_model=2560, nheads=32, headdim=80, ngroups=32, d_state=80,
                       in_proj_bias=True, out_proj_bias=True)
    return Mamba2Mixer(cfg, 0).cuda().bfloat16().eval()


def phi2_attention():
    from transformers import PhiConfig
    from transformers.models.phi.modeling_phi import PhiAttention, PhiRotaryEmbedding

    cfg = PhiConfig(hidden_size=2560, num_attention_heads=32, num_key_value_heads=32, intermediate_size=10240,
                    partial_rotary_factor=0.4, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    return PhiAttention(cfg, 0).cuda().bfloat16().eval(), PhiRotaryEmbedding(cfg).cuda()


@torch.no_grad()
def time_prefill(T: int) -> dict:
    from transformers.cache_utils import Cache

    from matvlm.model.cache import MambaLayerState
    from matvlm.ops.attention import sdpa_without_cudnn

    mixer = phi2_mixer()
    attn, rope = phi2_attention()
    u = torch.randn(1, T, 2560, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(T, device="cuda")[None]
    pe = rope(u, pos)
    out = {"T": T}
    out["mamba_prefill_ms"] = timed(lambda: mixer(u, cache=Cache(layers=[MambaLayerState()])))
    out["attention_prefill_ms"] = timed(lambda: attn(u, position_embeddings=pe, attention_mask=None))  # torch's pick
    with sdpa_without_cudnn():          # as matvlm's engine prefills (flash attention here)
        out["attention_prefill_no_cudnn_ms"] = timed(lambda: attn(u, position_embeddings=pe, attention_mask=None))
    with kernels_env("torch"):
        out["mamba_prefill_torch_ref_ms"] = timed(lambda: mixer(u), warmup=2, rep=5) if T <= 4096 else None
    return out


@torch.no_grad()
def time_decode(copy_GBps: float) -> dict:
    from matvlm.model.cache import MambaLayerState
    from transformers.cache_utils import Cache

    mixer = phi2_mixer()
    state = MambaLayerState()
    cache = Cache(layers=[state])
    mixer(torch.randn(1, 16, 2560, device="cuda", dtype=torch.bfloat16), cache=cache)   # prefill
    u1 = torch.randn(1, 1, 2560, device="cuda", dtype=torch.bfloat16)
    eager_ms = timed(lambda: mixer(u1, cache=cache), rep=50)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            mixer(u1, cache=cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mixer(u1, cache=cache)
    graph_ms = timed(graph.replay, rep=200)
    weight_bytes = sum(p.numel() * p.element_size() for p in mixer.parameters())
    state_bytes = 2 * (state.ssm.numel() * state.ssm.element_size() + state.conv.numel() * state.conv.element_size())
    roofline_ms = (weight_bytes + state_bytes) / (copy_GBps * 1e9) * 1e3
    return {"mamba_step_eager_ms": eager_ms, "mamba_step_graph_ms": graph_ms, "weight_MB": weight_bytes / 1e6,
            "state_rw_MB": state_bytes / 1e6, "roofline_ms": roofline_ms, "graph_over_roofline": graph_ms / roofline_ms}


def check_model_paths() -> dict:
    """A tiny hybrid on CUDA (float32): Triton path vs pure-PyTorch path logits, and cached greedy
    generation vs argmax of full forwards under the Triton path."""
    import tempfile

    import matvlm
    from matvlm.convert import convert
    from matvlm.toy.tiny import save_teacher, tiny_causal_lm

    with tempfile.TemporaryDirectory() as d:
        m, tok = tiny_causal_lm("llama", n_layer=4, hidden=128, heads=4, kv_heads=2, seed=0)
        save_teacher(m, tok, Path(d) / "t")
        convert(Path(d) / "t", Path(d) / "h", mamba_ratio=0.5)
        model = matvlm.load(Path(d) / "h", device="cuda")
        tok = matvlm.load_processor(Path(d) / "h")
    tok.padding_side = "left"
    batch = tok(["the quick brown fox jumps over", "hello"], return_tensors="pt", padding=True).to("cuda")
    with torch.no_grad():
        with kernels_env("triton"):
            lt = model(**batch).logits
            g = model.generate(**batch, max_new_tokens=8, do_sample=False)
        with kernels_env("torch"):
            lr = model(**batch).logits
    return {"tiny_model_logits_rel": rel(lt, lr), "tiny_model_greedy_tokens": g[:, -8:].tolist()}


def run_checks(lengths: list[int], only_decode: bool = False, log=lambda line: None) -> dict:
    """The checks and timings of this module's doc, as one record; `log` gets a line per finished part."""
    decode = check_decode_kernels()
    log(json.dumps(decode))
    if only_decode:
        return {"decode_kernels": decode}
    from matvlm.ops import ssd_triton

    kernels, why = ssd_triton.load()
    if kernels is None:
        from ..errors import MatvlmError

        raise MatvlmError(f"the Triton path is unavailable: {why}")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "ceilings": ceilings(), "decode_kernels": decode}
    log(json.dumps(res["ceilings"]))
    res["scan"] = []
    for T in lengths:
        t0 = time.time()
        res["scan"].append(check_scan(T))
        log(f"scan check T={T}: {json.dumps(res['scan'][-1])} ({time.time() - t0:.0f}s)")
    res["step_norm"] = check_step_and_norm()
    log(json.dumps(res["step_norm"]))
    res["model"] = check_model_paths()
    log(json.dumps(res["model"]))
    res["prefill"] = [time_prefill(T) for T in (4096, 16384)]
    log(json.dumps(res["prefill"]))
    res["decode"] = time_decode(res["ceilings"]["copy_GBps"])
    log(json.dumps(res["decode"]))
    return res


def report(res: dict) -> str:
    """The scan's errors per length as a markdown table, then prefill and decode timings."""
    lines = ["| check | " + " | ".join(f"T={r['T']}" for r in res["scan"]) + " |",
             "|---|" + "---|" * len(res["scan"])]
    for k in ["y", "final_state", "dx", "ddt", "dA", "dB", "dC", "dD", "dstate0"]:
        lines.append(f"| {k} rel err | " + " | ".join(f"{r[k]:.2e}" for r in res["scan"]) + " |")
    for p in res["prefill"]:
        lines.append(f"prefill T={p['T']}: mamba {p['mamba_prefill_ms']:.3f} ms, sdpa attention "
                     f"{p['attention_prefill_ms']:.3f} ms")
    d = res["decode"]
    lines.append(f"decode step: eager {d['mamba_step_eager_ms'] * 1e3:.1f} us, graph "
                 f"{d['mamba_step_graph_ms'] * 1e3:.1f} us, roofline {d['roofline_ms'] * 1e3:.1f} us "
                 f"({d['graph_over_roofline']:.2f}x)")
    return "\n".join(lines)
