"""Triton kernels of `ops.attention` for decode steps.

- `decode_attention(q, keys, values, mask, n_keys, scale)`: softmax(q k^T * scale) v for one query
  per (sequence, head) over a static KV buffer, split along the keys (flash-decoding): every split
  keeps a running max, sum and weighted values, and a second kernel combines the splits. Only the
  first `n_keys` positions (a device scalar: the cache's slot + 1) are read, so a CUDA graph captured
  once serves every step while reading only the keys written so far.
- `rope_kv(qkv, cos, sin, keys, values, slot, heads)`: rotary embedding of the queries and keys, and
  the keys and values written into the cache at `slot`.
- `attend_step(qkv, cos, sin, keys, values, mask, slot, heads, scale)`: both of the above in the
  split-KV kernel: queries and the new key rotated in registers, the new key and value written at
  `slot` and attended to from registers.

Registered as custom ops; their PyTorch twins are `ops.attention.rope_kv_ref`, `decode_attention_ref`
and `attend_ref`. Imported only when triton is installed.
"""


import torch
import triton
import triton.language as tl
from torch import Tensor

from .backend import dependent_launch
from .pdl_triton import after_previous, launch_options


@triton.jit
def _rope_lanes(row, cs_row, sn_row, rd, R, D: tl.constexpr):
    """Lanes `rd` of one head's projection `row` in float32, the first R channels rotated (rotate-half:
    x cos + [-x2, x1] sin, cs_row / sn_row the (R,) cos and sin)."""
    half = R // 2
    x = tl.load(row + rd, mask=rd < D, other=0.0).to(tl.float32)
    rot = rd < R
    partner = tl.where(rd < half, rd + half, rd - half)
    other = tl.load(row + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(cs_row + rd, mask=rot, other=1.0).to(tl.float32)
    sin = tl.load(sn_row + rd, mask=rot, other=0.0).to(tl.float32)
    return tl.where(rot, x * cos + tl.where(rd < half, -other, other) * sin, x)


@triton.jit
def _attention_split(q_ptr, k_ptr, v_ptr, mask_ptr, n_ptr, cos_ptr, sin_ptr, m_buf, l_buf, acc_buf, scale,
                     H, KV, R, SPLIT_LEN, N_SPLITS,
                     sq_b, sq_h, s_cs, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sm_b, s_n,
                     D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, BLOCK_L: tl.constexpr,
                     APPEND: tl.constexpr, PDL: tl.constexpr):
    """One (split of the keys, sequence, head): running max, normaliser and weighted value sum of its
    keys. A head's D channels are two tiles, DA (the largest power of two <= D) and DB (the rest, padded
    to a power of two; unused where D == DA), so D = 80 reads 64 + 16 lanes instead of 128.

    APPEND=False: q_ptr is (B, H, D) queries; n_ptr holds the number of cache positions to read.
    APPEND=True: q_ptr is the step's projection (B, (H + 2 KV) D); the queries and the new key get the
    rotary embedding here, n_ptr holds the new token's slot, the cache is read below it, and the
    program whose split holds the slot takes the new key and value from registers (and, for the first
    query head of its KV group, writes them into the cache).
    n_ptr holds one value for every sequence where s_n is 0, else one per sequence: a split past its
    sequence's count reads nothing, so sequences of different lengths in one buffer read their own keys."""
    after_previous(PDL)
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)                     # 64-bit offsets: (rows x a row's stride) may pass 2^31
    h = bh % H
    group = H // KV
    kvh = h // group
    ra = tl.arange(0, DA)
    rb = DA + tl.arange(0, DB)                     # masked off entirely where D == DA
    row = q_ptr + b * sq_b
    cs_row = cos_ptr + b * s_cs
    sn_row = sin_ptr + b * s_cs
    n_keys = tl.load(n_ptr + b * s_n)              # APPEND: the slot; cache positions below it are read
    if APPEND:
        q_a = _rope_lanes(row + h * sq_h, cs_row, sn_row, ra, R, D)
        q_b = _rope_lanes(row + h * sq_h, cs_row, sn_row, rb, R, D)
    else:
        q_a = tl.load(row + h * sq_h + ra).to(tl.float32)
        q_b = tl.load(row + h * sq_h + rb, mask=rb < D, other=0.0).to(tl.float32)
    # the queries as the cache stores keys (what the two-kernel path computes with), then scaled
    q_a = q_a.to(k_ptr.dtype.element_ty).to(tl.float32) * scale
    q_b = q_b.to(k_ptr.dtype.element_ty).to(tl.float32) * scale
    m_i = tl.full((), -1e30, tl.float32)
    l_i = tl.full((), 0.0, tl.float32)
    acc_a = tl.zeros((DA,), dtype=tl.float32)
    acc_b = tl.zeros((DB,), dtype=tl.float32)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, n_keys)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    for start in range(lo, hi, BLOCK_L):
        offs = start + tl.arange(0, BLOCK_L)
        inside = offs < hi
        k = tl.load(k_base + offs[:, None] * sk_l + ra[None, :], mask=inside[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q_a[None, :], axis=1)
        if D > DA:
            kb = tl.load(k_base + offs[:, None] * sk_l + rb[None, :], mask=inside[:, None] & (rb < D)[None, :],
                         other=0.0)
            s += tl.sum(kb.to(tl.float32) * q_b[None, :], axis=1)
        ok = tl.load(mask_ptr + b * sm_b + offs, mask=inside, other=0) != 0
        s = tl.where(ok & inside, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + offs[:, None] * sv_l + ra[None, :], mask=inside[:, None], other=0.0)
        acc_a = acc_a * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        if D > DA:
            vb = tl.load(v_base + offs[:, None] * sv_l + rb[None, :], mask=inside[:, None] & (rb < D)[None, :],
                         other=0.0)
            acc_b = acc_b * alpha + tl.sum(p[:, None] * vb.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    if APPEND:
        if n_keys // SPLIT_LEN == split:           # this split holds the new token's slot
            k_row = row + (H + kvh) * D
            v_row = row + (H + KV + kvh) * D
            k_a = _rope_lanes(k_row, cs_row, sn_row, ra, R, D).to(k_ptr.dtype.element_ty)
            k_b = _rope_lanes(k_row, cs_row, sn_row, rb, R, D).to(k_ptr.dtype.element_ty)
            v_a = tl.load(v_row + ra).to(v_ptr.dtype.element_ty)
            v_b = tl.load(v_row + rb, mask=rb < D, other=0.0).to(v_ptr.dtype.element_ty)
            if h % group == 0:
                tl.store(k_base + n_keys * sk_l + ra, k_a)
                tl.store(k_base + n_keys * sk_l + rb, k_b, mask=rb < D)
                tl.store(v_base + n_keys * sv_l + ra, v_a)
                tl.store(v_base + n_keys * sv_l + rb, v_b, mask=rb < D)
            s1 = tl.sum(k_a.to(tl.float32) * q_a, axis=0) + tl.sum(k_b.to(tl.float32) * q_b, axis=0)
            s1 = tl.where(tl.load(mask_ptr + b * sm_b + n_keys) != 0, s1, float("-inf"))
            m_new = tl.maximum(m_i, s1)
            p1 = tl.exp(s1 - m_new)
            alpha = tl.exp(m_i - m_new)
            acc_a = acc_a * alpha + p1 * v_a.to(tl.float32)
            acc_b = acc_b * alpha + p1 * v_b.to(tl.float32)
            l_i = l_i * alpha + p1
            m_i = m_new
    tl.store(m_buf + bh * N_SPLITS + split, m_i)
    tl.store(l_buf + bh * N_SPLITS + split, l_i)
    tl.store(acc_buf + (bh * N_SPLITS + split) * D + ra, acc_a)
    tl.store(acc_buf + (bh * N_SPLITS + split) * D + rb, acc_b, mask=rb < D)


@triton.jit
def _attention_combine(m_buf, l_buf, acc_buf, o_ptr, H, N_SPLITS, so_b, so_h,
                       D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    after_previous(PDL)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rs = tl.arange(0, BLOCK_S)
    live = rs < N_SPLITS
    rd = tl.arange(0, BLOCK_D)
    m = tl.load(m_buf + bh * N_SPLITS + rs, mask=live, other=-1e30)
    l = tl.load(l_buf + bh * N_SPLITS + rs, mask=live, other=0.0)
    acc = tl.load(acc_buf + (bh * N_SPLITS + rs)[:, None] * D + rd[None, :], mask=live[:, None] & (rd < D)[None, :],
                  other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + b * so_b + h * so_h + rd, out.to(o_ptr.dtype.element_ty), mask=rd < D)


def attention_plan(bsz: int, heads: int, length: int, sms: int) -> dict:
    """Launch parameters of the split-KV kernel for a (bsz, heads, length) buffer on `sms`
    multiprocessors: keys per program, the key block, warps (and, optionally, "stages" for the loop's
    software pipelining). One warp, 64-key blocks and about eight programs per SM, with the keys per
    program rounded up to a power of two, were the best plan of a sweep on an H100 at 1 280, 4 352,
    8 448 and 16 640 positions for one sequence of 32 heads x 80 (keys per program 64-1024, blocks
    16-128, 1-4 warps); one warp and 64-key blocks were also the best at head sizes 64 and 128
    (docs/benchmarks.md). A function of the buffer's shape, not of how many keys are written, so one
    CUDA graph serves every step."""
    block_l = 64
    per = max(1, 8 * sms // (bsz * heads))              # splits per (sequence, head)
    split_len = max(block_l, triton.next_power_of_2(-(-length // per)))
    return {"split_len": split_len, "block_l": block_l, "warps": 1}


@torch.library.custom_op("matvlm::decode_attention", mutates_args=())
def decode_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor, n_keys: Tensor, scale: float) -> Tensor:
    """One query per (sequence, head). q: (B, H, D); keys, values: (B, KV, L, D) with unit stride along
    D (H a multiple of KV); mask: (B, L) bool, True where a key may be attended to; n_keys: () int64,
    or (B,) one per sequence: keys at and after it are not read. Returns (B, H, D) in q's dtype."""
    return launch_attention(q, keys, values, mask, n_keys, scale,
                            torch.cuda.get_device_properties(q.device).multi_processor_count)


def _lanes(d: int) -> tuple[int, int]:
    """The split kernel's two channel tiles for head size d: the largest power of two <= d, and the
    rest padded to a power of two (16, masked off, where there is no rest)."""
    da = 1 << (d.bit_length() - 1)
    return da, triton.next_power_of_2(d - da) if d > da else 16


def _split_and_combine(src, keys, values, mask, count, cos, sin, scale, heads, sq, sms, plan, append):
    """Launch the split kernel over `src` (queries, or the projection when `append`) and the combine
    kernel; returns (B, H, D) in src's dtype."""
    bsz, kv, length, d = keys.shape
    p = plan or attention_plan(bsz, heads, length, sms)
    da, db = _lanes(d)
    splits = -(-length // p["split_len"])
    m = torch.empty((bsz * heads, splits), dtype=torch.float32, device=src.device)
    l = torch.empty_like(m)
    acc = torch.empty((bsz * heads, splits, d), dtype=torch.float32, device=src.device)
    out = torch.empty((bsz, heads, d), dtype=src.dtype, device=src.device)
    pdl = launch_options(dependent_launch(src))
    _attention_split[(splits, bsz * heads)](
        src, keys, values, mask, count, cos, sin, m, l, acc, scale, heads, kv, cos.shape[-1], p["split_len"],
        splits, sq[0], sq[1], cos.stride(0), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0), count.stride(0) if count.dim() else 0,
        D=d, DA=da, DB=db, BLOCK_L=p["block_l"], APPEND=append, num_warps=p["warps"],
        **({"num_stages": p["stages"]} if "stages" in p else {}), **pdl)
    _attention_combine[(bsz * heads,)](m, l, acc, out, heads, splits, out.stride(0), out.stride(1),
                                       D=d, BLOCK_S=triton.next_power_of_2(splits),
                                       BLOCK_D=triton.next_power_of_2(d), num_warps=1, **pdl)
    return out


def launch_attention(q, keys, values, mask, n_keys, scale, sms: int, plan: dict | None = None):
    """`decode_attention`'s launcher, for a device of `sms` multiprocessors (`plan` overrides
    `attention_plan`)."""
    return _split_and_combine(q, keys, values, mask, n_keys, q, q, scale, q.shape[1], (q.stride(0), q.stride(1)),
                              sms, plan, False)


@decode_attention.register_fake
def _(q, keys, values, mask, n_keys, scale):
    return q.new_empty(q.shape)


@triton.jit
def _rope_kv(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr, H, KV, D, R,
             s_qkv, s_cs, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, s_slot, BLOCK_D: tl.constexpr,
             PDL: tl.constexpr):
    after_previous(PDL)
    b = tl.program_id(0).to(tl.int64)              # 64-bit offsets: (rows x a row's stride) may pass 2^31
    head = tl.program_id(1)                        # 0..H-1: queries, H..H+KV-1: keys (and their values)
    rd = tl.arange(0, BLOCK_D)
    row = qkv_ptr + b * s_qkv + head * D           # keys follow the queries in the projection
    x = _rope_lanes(row, cos_ptr + b * s_cs, sin_ptr + b * s_cs, rd, R, D)
    if head < H:
        tl.store(q_ptr + b * sq_b + head * sq_h + rd, x.to(q_ptr.dtype.element_ty), mask=rd < D)
    else:
        slot = tl.load(slot_ptr + b * s_slot)        # s_slot 0: one slot for every row
        kv = head - H
        tl.store(k_ptr + b * sk_b + kv * sk_h + slot * sk_l + rd, x.to(k_ptr.dtype.element_ty), mask=rd < D)
        v = tl.load(qkv_ptr + b * s_qkv + (H + KV + kv) * D + rd, mask=rd < D, other=0.0)
        tl.store(v_ptr + b * sv_b + kv * sv_h + slot * sv_l + rd, v.to(v_ptr.dtype.element_ty), mask=rd < D)


@torch.library.custom_op("matvlm::rope_kv", mutates_args=("keys", "values"))
def rope_kv(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, slot: Tensor, heads: int) -> Tensor:
    """Rotary embedding (rotate-half) of the first R channels of each query and key head, and the keys
    and values written into the cache at `slot`. qkv: (B, (H + 2 KV) D) with rows contiguous; cos, sin:
    (B, R) with unit stride; keys, values: (B, KV, L, D); slot: () int64, or (B,) one per row. Returns
    the queries (B, H, D)."""
    bsz = qkv.shape[0]
    kv, d = keys.shape[1], keys.shape[3]
    q = torch.empty((bsz, heads, d), dtype=qkv.dtype, device=qkv.device)
    _rope_kv[(bsz, heads + kv)](qkv, cos, sin, q, keys, values, slot, heads, kv, d, cos.shape[1],
                                qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1),
                                keys.stride(0), keys.stride(1), keys.stride(2),
                                values.stride(0), values.stride(1), values.stride(2),
                                slot.stride(0) if slot.dim() else 0, BLOCK_D=triton.next_power_of_2(d), num_warps=1,
                                **launch_options(dependent_launch(qkv)))
    return q


@rope_kv.register_fake
def _(qkv, cos, sin, keys, values, slot, heads):
    return qkv.new_empty((qkv.shape[0], heads, keys.shape[3]))


@torch.library.custom_op("matvlm::attend_step", mutates_args=("keys", "values"))
def attend_step(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, mask: Tensor, slot: Tensor,
                heads: int, scale: float) -> Tensor:
    """`rope_kv` and then `decode_attention` over the cache positions up to and including `slot`, in
    one split kernel (and the combine): the queries and the new key are rotated in registers, the new
    key and value written at `slot` and attended to from registers. qkv: (B, (H + 2 KV) D) with rows
    contiguous; cos, sin: (B, R) with unit stride; keys, values: (B, KV, L, D) with unit stride along
    D; mask: (B, L) bool; slot: () int64, or (B,) one per sequence, below L (not checked: it is on the
    device). Returns (B, H, D) in qkv's dtype."""
    return launch_attend(qkv, cos, sin, keys, values, mask, slot, heads, scale,
                         torch.cuda.get_device_properties(qkv.device).multi_processor_count)


def launch_attend(qkv, cos, sin, keys, values, mask, slot, heads, scale, sms: int, plan: dict | None = None):
    """`attend_step`'s launcher, for a device of `sms` multiprocessors (`plan` overrides
    `attention_plan`)."""
    return _split_and_combine(qkv, keys, values, mask, slot, cos, sin, scale, heads, (qkv.stride(0), keys.shape[3]),
                              sms, plan, True)


@attend_step.register_fake
def _(qkv, cos, sin, keys, values, mask, slot, heads, scale):
    return qkv.new_empty((qkv.shape[0], heads, keys.shape[3]))
