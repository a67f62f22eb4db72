"""The sweeps behind the fused decode step's kernel choices (GPU only; prints JSON lines).

    python scripts/decode-kernels-probe.py [gemv|fused|attention|attend|attend-shapes|mamba|all]

gemv: cuBLAS vs two Triton matrix-vector variants (element-wise, and 16-row tl.dot) over a grid of
block sizes, on TinyLLaVA's fused shapes at batch 1 and 8, plus sdpa for one query per head.
fused: matvlm's products (norm / activations folded in) against PyTorch.
attention: the split-KV attention kernel over a grid of plans against sdpa, at 1 280 / 4 352 / 16 640
positions, batch 1 and 8.
attend: rotary + cache write + split-KV attention in one kernel over a grid of plans, against the
rotary kernel followed by the split-KV kernel or by sdpa.
attend-shapes: the same under its default plan for other models' head layouts (GQA, head size 64 / 128).
mamba: the one-kernel Mamba-2 decode step against the PyTorch ops, over block sizes and warps.
Every timing is the median of CUDA-graph replays over enough weight copies to miss L2.
"""
import json, os, sys, math, itertools
from matvlm import ops
from matvlm.ops import attention_triton as at, mamba_decode_triton as mt
import torch, triton, triton.language as tl
import torch.nn.functional as F

OUT = os.environ.get("OUT", "/tmp")
dev = "cuda"
torch.manual_seed(0)
res = []
def rec(**k):
    res.append(k); print(json.dumps(k), flush=True)

def graph_time(fn, reps=20):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3): g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]

@triton.jit
def gemv_fma(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN:
            w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :])
            x = tl.load(x_ptr + kk)
        else:
            w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.)
            x = tl.load(x_ptr + kk, mask=kk < K, other=0.)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=rn < N)

@triton.jit
def gemv_dot(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_x, stride_w, stride_y, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        w = tl.load(w_ptr + rn[:, None] * stride_w + kk[None, :], mask=(rn[:, None] < N) & (kk[None, :] < K), other=0.)
        x = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))

def run_fma(x, w, b, y, BN, BK, nw, ns):
    N, K = w.shape
    even = (N % BN == 0) and (K % BK == 0)
    gemv_fma[(triton.cdiv(N, BN),)](x, w, b if b is not None else w, y, N, K, w.stride(0), b is not None,
                                    BN, BK, even, num_warps=nw, num_stages=ns)

def run_dot(x, w, b, y, BN, BK, nw, ns):
    M, K = x.shape; N = w.shape[0]
    gemv_dot[(triton.cdiv(N, BN),)](x, w, b if b is not None else w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                    b is not None, 16, BN, BK, num_warps=nw, num_stages=ns)


def gemv_sweep():
    # copy bandwidth
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16); dst = torch.empty_like(src)
    t = graph_time(lambda: dst.copy_(src)); copy = 2 * src.numel() * 2 / t / 1e6
    rec(copy_GBps=copy)
    red = torch.empty(1, device=dev)
    t = graph_time(lambda: torch.sum(src.view(-1, 1024), dim=1))
    rec(read_sum_GBps=src.numel() * 2 / t / 1e6)
    del src, dst

    shapes = {"q": (2560, 2560), "qkv": (7680, 2560), "fc1": (10240, 2560), "in_attn_fc1": (17920, 2560),
              "in_mamba_fc1": (20512, 2560), "fc2": (2560, 10240), "out_dense_fc2": (2560, 12800),
              "lm_head": (51200, 2560)}
    for name, (N, K) in shapes.items():
        copies = max(2, math.ceil(400e6 / (N * K * 2)))
        ws = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        bs = [torch.randn(N, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        nbytes = N * K * 2
        row = {"shape": name, "N": N, "K": K, "MB": nbytes / 1e6}
        for M in (1, 8):
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ys = [torch.empty(M, N, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            ref = (x.double() @ ws[0].double().T + bs[0].double())
            def cub():
                for w, b, y in zip(ws, bs, ys):
                    torch.addmm(b, x, w.T, out=y)
            t = graph_time(cub) / copies
            row[f"cublas_M{M}_us"] = t * 1e3; row[f"cublas_M{M}_GBps"] = nbytes / t / 1e6
            candidates = [("dot", run_dot, itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4)))]
            if M == 1:
                fma = [c for c in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 2, 3))
                       if 512 <= c[0] * c[1] <= 16384]
                candidates.insert(0, ("fma", run_fma, fma))
            best = None
            for kind, runner, configs in candidates:
                for BN, BK, nw, ns in configs:
                    def f():
                        for w, b, y in zip(ws, bs, ys): runner(x, w, b, y, BN, BK, nw, ns)
                    try:
                        f(); torch.cuda.synchronize()
                        err = ((ys[0].double() - ref).norm() / ref.norm()).item()
                        t = graph_time(f, reps=10) / copies
                    except Exception:
                        continue                       # a configuration Triton cannot compile
                    if best is None or t < best[0]: best = (t, (kind, BN, BK, nw, ns), err)
            t, cfg, err = best
            row[f"triton_M{M}_us"] = t * 1e3; row[f"triton_M{M}_GBps"] = nbytes / t / 1e6
            row[f"triton_M{M}_cfg"] = cfg; row[f"triton_M{M}_relerr"] = err
        rec(**row)
        del ws, bs, ys

    # decode attention: sdpa with a bool mask vs flash (no mask) at batch 1, 32 heads x 80
    for L in (1280, 4352, 16640):
        for B in (1, 8):
            q = torch.randn(B, 32, 1, 80, device=dev, dtype=torch.bfloat16)
            copies = max(2, math.ceil(200e6 / (B * 32 * L * 80 * 4)))
            ks = [torch.randn(B, 32, L, 80, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            vs = [torch.randn(B, 32, L, 80, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
            mask = torch.zeros(B, 1, 1, L, dtype=torch.bool, device=dev); mask[..., : L - 200] = True
            nbytes = 2 * B * 32 * L * 80 * 2
            def a():
                for k, v in zip(ks, vs): F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            t = graph_time(a) / copies
            def a2():
                for k, v in zip(ks, vs): F.scaled_dot_product_attention(q, k[:, :, : L - 200], v[:, :, : L - 200])
            t2 = graph_time(a2) / copies
            rec(attn_L=L, B=B, sdpa_mask_us=t * 1e3, sdpa_mask_GBps=nbytes / t / 1e6, sdpa_nomask_us=t2 * 1e3,
                sdpa_nomask_GBps=nbytes * (L - 200) / L / t2 / 1e6)
            del ks, vs

    json.dump(res, open(f"{OUT}/probe.json", "w"), indent=1)
    print("\n| shape | MB | cuBLAS M1 GB/s | Triton M1 GB/s | cfg | cuBLAS M8 | Triton M8 | cfg |")
    for r in res:
        if "shape" in r:
            print(f"| {r['shape']} | {r['MB']:.1f} | {r['cublas_M1_GBps']:.0f} ({r['cublas_M1_us']:.1f}us) | {r['triton_M1_GBps']:.0f} ({r['triton_M1_us']:.1f}us) | {r['triton_M1_cfg']} | {r['cublas_M8_GBps']:.0f} | {r['triton_M8_GBps']:.0f} | {r['triton_M8_cfg']} |")


def fused_kernels():
    """matvlm's products with norm / activations folded in against LayerNorm + cuBLAS (+ GELU), batch 1 and 8:
    GELU on the first product's fc1 outputs (the fused step's choice) or on the second product's inputs."""
    nw = torch.randn(2560, device=dev).bfloat16(); nb = torch.randn(2560, device=dev).bfloat16()
    for M in (1, 8):
        x = torch.randn(M, 2560, device=dev).bfloat16()
        win = [torch.randn(17920, 2560, device=dev).bfloat16() * .02 for _ in range(6)]
        bin_ = torch.randn(17920, device=dev).bfloat16()
        ln = ("layer", nw, nb, 1e-5)
        t_in = graph_time(lambda: [ops.linear(x, w, bin_, norm=ln) for w in win]) / 6
        t_in_gelu = graph_time(lambda: [ops.linear(x, w, bin_, norm=ln, out_act="gelu_tanh", out_act_from=7680)
                                        for w in win]) / 6
        t_in_cub = graph_time(lambda: [F.linear(F.layer_norm(x, (2560,), nw, nb), w, bin_) for w in win]) / 6
        del win
        a = torch.randn(M, 2560, device=dev).bfloat16(); tail = torch.randn(M, 10240, device=dev).bfloat16()
        wout = [torch.randn(2560, 12800, device=dev).bfloat16() * .02 for _ in range(8)]
        t_out_act = graph_time(lambda: [ops.linear(a, w, nw, residual=a, tail=tail, act="gelu_tanh") for w in wout]) / 8
        t_out = graph_time(lambda: [ops.linear(a, w, nw, residual=a, tail=tail) for w in wout]) / 8
        t_out_cub = graph_time(lambda: [F.linear(torch.cat([a, F.gelu(tail, approximate="tanh")], -1), w, nw) + a
                                        for w in wout]) / 8
        del wout
        rec(M=M, in_ln_us=t_in * 1e3, in_ln_gelu_out_us=t_in_gelu * 1e3, in_torch_us=t_in_cub * 1e3,
            out_gelu_in_us=t_out_act * 1e3, out_plain_us=t_out * 1e3, out_torch_us=t_out_cub * 1e3,
            in_GBps=17920 * 2560 * 2 / t_in_gelu / 1e6, out_GBps=2560 * 12800 * 2 / t_out / 1e6)


def attention_sweep():
    """The split-KV kernel over plans (keys per program, key block, warps) against sdpa,
    one query per head, 32 heads x 80, at 1 280 / 4 352 / 16 640 positions and batch 1 and 8, with the
    default plan's time beside the best."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for L in (1280, 4352, 16640):
        for B in (1, 8):
            copies = max(2, math.ceil(300e6 / (B * 32 * L * 80 * 4)))
            q = torch.randn(B, 32, 80, device=dev).bfloat16()
            Ks = [torch.randn(B, 32, L, 80, device=dev).bfloat16() for _ in range(copies)]
            Vs = [torch.randn(B, 32, L, 80, device=dev).bfloat16() for _ in range(copies)]
            mask = torch.zeros(B, L, dtype=torch.bool, device=dev); mask[:, :L - 200] = True
            nk = torch.tensor(L - 200, device=dev)
            nbytes = 2 * B * 32 * (L - 200) * 80 * 2
            t_sdpa = graph_time(lambda: [F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None])
                                         for k, v in zip(Ks, Vs)]) / copies
            ref = F.scaled_dot_product_attention(q[:, :, None].double(), Ks[0].double(), Vs[0].double(),
                                                 attn_mask=mask[:, None, None])[:, :, 0]
            def timed_plan(plan):
                out = at.launch_attention(q, Ks[0], Vs[0], mask, nk, 80 ** -0.5, sms, plan)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                t = graph_time(lambda: [at.launch_attention(q, k, v, mask, nk, 80 ** -0.5, sms, plan)
                                        for k, v in zip(Ks, Vs)], reps=10) / copies
                return t, err
            default = at.attention_plan(B, 32, L, sms)
            t_def, err_def = timed_plan(None)
            rows = []
            for split_len in (64, 128, 256, 512, 1024, 2048):
                if -(-L // split_len) > 1024:
                    continue
                for BL in (32, 64, 128):
                    if BL > split_len:
                        continue
                    for nw_ in (2, 4):
                        plan = {"split_len": split_len, "block_l": BL, "warps": nw_}
                        try:
                            t, err = timed_plan(plan)
                        except Exception:
                            continue
                        rows.append((t, plan, err))
            rows.sort(key=lambda r: r[0])
            rec(L=L, B=B, sdpa_us=t_sdpa * 1e3, sdpa_GBps=nbytes / t_sdpa / 1e6,
                default_plan=default, default_us=t_def * 1e3, default_GBps=nbytes / t_def / 1e6, default_err=err_def,
                best=[{"us": t * 1e3, "GBps": nbytes / t / 1e6, **plan, "err": err} for t, plan, err in rows[:6]],
                worst_err=max(r[2] for r in rows))
            del Ks, Vs


class AttendCase:
    """One attention layer's decode step at batch B, H query heads on KV heads of size D, rotary on
    `rdim` channels, over an L-position cache with the new token 200 positions before its end: enough
    cache copies to miss L2, and the float64 reference. `timed(fn)` runs fn(keys, values) on every copy
    in a CUDA graph: (microseconds per call, relative error of the first copy's output)."""

    def __init__(self, B, H, KV, D, L, rdim):
        from matvlm.bench.kernels import attention_f64, rotary_inputs
        self.H, self.D, self.group, self.scale = H, D, H // KV, D ** -0.5
        self.copies = max(2, math.ceil(300e6 / (B * KV * L * D * 4)))
        self.qkv, self.cos, self.sin = rotary_inputs(B, H, KV, D, rdim, device=dev)
        self.Ks = [torch.randn(B, KV, L, D, device=dev).bfloat16() for _ in range(self.copies)]
        self.Vs = [torch.randn(B, KV, L, D, device=dev).bfloat16() for _ in range(self.copies)]
        self.slot = L - 200
        self.mask = torch.zeros(B, L, dtype=torch.bool, device=dev)
        self.mask[:, :self.slot + 1] = True
        self.st, self.nk = torch.tensor(self.slot, device=dev), torch.tensor(self.slot + 1, device=dev)
        self.bias = ops.mask_bias(self.mask, torch.bfloat16)
        self.nbytes = 2 * B * KV * self.slot * D * 2                 # the cache read below the slot
        kr, vr = self.Ks[0].double().clone(), self.Vs[0].double().clone()
        q = ops.rope_kv(self.qkv.double(), self.cos.double(), self.sin.double(), kr, vr, self.st, H)
        self.ref = attention_f64(q, kr, vr, self.mask, self.slot + 1, self.scale)

    def rope_sdpa(self, k, v):
        q = at.rope_kv(self.qkv, self.cos, self.sin, k, v, self.st, self.H)
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=self.bias, scale=self.scale,
                                              enable_gqa=self.group > 1)[:, :, 0]

    def rope_split(self, k, v, sms, plan=None):
        q = at.rope_kv(self.qkv, self.cos, self.sin, k, v, self.st, self.H)
        return at.launch_attention(q, k, v, self.mask, self.nk, self.scale, sms, plan)

    def attend(self, k, v, sms, plan=None):
        return at.launch_attend(self.qkv, self.cos, self.sin, k, v, self.mask, self.st, self.H, self.scale, sms, plan)

    def timed(self, fn):
        out = fn(self.Ks[0], self.Vs[0])
        err = ((out.double() - self.ref).norm() / self.ref.norm()).item()
        t = graph_time(lambda: [fn(k, v) for k, v in zip(self.Ks, self.Vs)], reps=10) / self.copies
        return t * 1e3, err


def attend_sweep():
    """An attention layer's whole decode step after its projection, TinyLLaVA-Phi2 shapes (32 heads x 80,
    rotary on 32 channels): `attend_step` (rotary, cache write and split-KV attention in one kernel) over
    plans, against the rotary kernel + the split-KV kernel (default plan) and the rotary kernel + sdpa,
    at 1 280 / 4 352 / 8 448 / 16 640 positions, batch 1 (and batch 8 over a few plans)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for L, B in ((1280, 1), (4352, 1), (8448, 1), (16640, 1), (1280, 8), (4352, 8)):
        c = AttendCase(B, 32, 32, 80, L, 32)
        row = {"L": L, "B": B, "GB": c.nbytes / 1e9}
        row["rope_sdpa_us"], row["rope_sdpa_err"] = c.timed(c.rope_sdpa)
        row["default_plan"] = at.attention_plan(B, 32, L, sms)
        row["rope_split_us"], row["rope_split_err"] = c.timed(lambda k, v: c.rope_split(k, v, sms))
        row["attend_us"], row["attend_err"] = c.timed(lambda k, v: c.attend(k, v, sms))
        rows = []
        lens = (64, 128, 256, 512, 1024) if B == 1 else (256, 512, 1024)
        for split_len in lens:
            if -(-L // split_len) > 1024:
                continue
            for BL in (16, 32, 64, 128):
                for nw_ in (1, 2, 4):
                    if BL > split_len or (B > 1 and nw_ == 1):
                        continue
                    plan = {"split_len": split_len, "block_l": BL, "warps": nw_}
                    try:
                        t, err = c.timed(lambda k, v: c.attend(k, v, sms, plan))
                    except Exception as e:
                        print("plan failed", plan, repr(e)[:200], flush=True)
                        continue
                    rows.append((t, plan, err))
        rows.sort(key=lambda r: r[0])
        if B == 1:                      # the default plan under each software-pipelining depth
            for stages in (1, 2, 3, 4):
                plan = {**row["default_plan"], "stages": stages}
                row[f"attend_stages{stages}_us"] = c.timed(lambda k, v: c.attend(k, v, sms, plan))[0]
        for k_ in ("rope_sdpa_us", "rope_split_us", "attend_us"):
            row[k_.replace("_us", "_GBps")] = c.nbytes / row[k_] / 1e3
        row["best"] = [{"us": t, "GBps": c.nbytes / t / 1e3, **plan, "err": err} for t, plan, err in rows[:8]]
        row["worst_err"] = max(r[2] for r in rows)
        rec(**row)
        del c


def attend_shapes():
    """`attend_step` under its default plan against the rotary kernel + sdpa for other models' heads
    (query heads, KV heads, head size): Llama-style 32 x 128 with 8 KV heads, Qwen2-0.5B's 14 x 64 with
    2, and 32 x 128 without grouping; batch 1 at 1 280 / 4 352 / 8 448 positions, with the warps and
    key blocks around the default."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rounded = (lambda r: (round(r[0], 2), round(r[1], 5)))
    for H, KV, D in ((32, 8, 128), (14, 2, 64), (32, 32, 128)):
        for L in (1280, 4352, 8448):
            c = AttendCase(1, H, KV, D, L, D)
            default = at.attention_plan(1, H, L, sms)
            row = {"H": H, "KV": KV, "D": D, "L": L, "default_plan": default,
                   "rope_sdpa": rounded(c.timed(c.rope_sdpa)),
                   "attend_default": rounded(c.timed(lambda k, v: c.attend(k, v, sms)))}
            for BL in (32, 64):
                for nw_ in (1, 2, 4):
                    plan = {**default, "block_l": BL, "warps": nw_}
                    row[f"b{BL}w{nw_}"] = rounded(c.timed(lambda k, v: c.attend(k, v, sms, plan)))
            rec(**row)
            del c


def mamba_sweep():
    """One Mamba-2 decode step after the input projection (TinyLLaVA-Phi2 shapes: 32 heads x 80, 32 groups,
    state 80) at batch 1 and 8: the one-kernel step over (block of P, warps) against the PyTorch ops
    with mamba_ssm's state-update and norm kernels; each in a CUDA graph over 8 layers' states."""
    from matvlm.bench.kernels import phi2_mixer
    mixer = phi2_mixer()
    for B in (1, 8):
        zx = torch.randn(B, mixer.in_proj.out_features, device=dev).bfloat16()
        convs = [torch.randn(B, mixer.cfg.conv_dim, 3, device=dev).bfloat16() for _ in range(8)]
        ssms = [torch.randn(B, 32, 80, 80, device=dev) for _ in range(8)]
        args = (mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight)
        row = {"B": B}
        from matvlm.ops.mamba_decode import mamba_step_ref      # the PyTorch twin (its scan ops still dispatch)
        row["torch_ops_us"] = graph_time(lambda: [mamba_step_ref(zx, c, s, *args, 1e-5, 32)
                                                 for c, s in zip(convs, ssms)]) / 8 * 1e3
        best = None
        for bp in (16, 32, 64, 128):
            for nw_ in (2, 4, 8):
                t = graph_time(lambda: [mt.launch_mamba_step(zx, c, s, *args, 1e-5, 32, block_p=bp, warps=nw_)
                                        for c, s in zip(convs, ssms)]) / 8
                if best is None or t < best[0]:
                    best = (t, bp, nw_)
        row.update(kernel_us=best[0] * 1e3, block_p=best[1], warps=best[2])
        row["default_us"] = graph_time(lambda: [mt.mamba_step(zx, c, s, *args, 1e-5, 32)
                                                for c, s in zip(convs, ssms)]) / 8 * 1e3
        state_bytes = B * (32 * 80 * 80 * 4 * 2 + mixer.cfg.conv_dim * 3 * 2 * 2)
        row["roofline_us"] = state_bytes / 2.98e12 * 1e6        # at the H100's copy bandwidth
        rec(**row)


SWEEPS = {"gemv": gemv_sweep, "fused": fused_kernels, "attention": attention_sweep, "attend": attend_sweep,
          "attend-shapes": attend_shapes, "mamba": mamba_sweep}

if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what != "all" and what not in SWEEPS:
        sys.exit(f"unknown sweep {what!r}; expected one of {', '.join(SWEEPS)} or all")
    for name, sweep in SWEEPS.items():
        if what in (name, "all"):
            sweep()
