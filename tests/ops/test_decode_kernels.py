"""The decode step's Triton kernels, run by Triton's interpreter on the CPU, against the PyTorch paths
of `matvlm.ops` (which the fused-step tests in tests/engine compare with transformers' layers) in
float32 (tests/conftest.py selects the interpreter before triton is imported). On a GPU,
`matvlm bench-kernels --only-decode` checks the compiled kernels in bf16."""

import pytest
import torch

from matvlm import ops
from matvlm.ops import attention_triton as at, gemv_triton as gt, mamba_decode_triton as mt


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("rows, k1, kt, act, norm, out_act", [
    (1, 96, 0, None, None, None), (1, 96, 200, "gelu_tanh", "layer", None), (3, 96, 200, "gelu_tanh", "layer", None),
    (1, 0, 200, "silu_mul", None, None), (5, 0, 200, "silu_mul", None, None), (1, 96, 0, None, "rms", None),
    (2, 96, 0, None, "rms", None), (1, 100, 60, "gelu", None, None), (1, 96, 0, None, "layer", "gelu_tanh"),
    (4, 96, 0, None, "layer", "gelu"), (1, 100, 60, "gelu", None, "gelu"), (1, 96, 200, None, "layer", None),
    (3, 96, 200, None, None, None)])
def test_matrix_vector_kernel_equals_the_pytorch_path(rows, k1, kt, act, norm, out_act):
    g = torch.Generator().manual_seed(rows * 1000 + k1 + kt)
    x = torch.randn(rows, k1, generator=g, dtype=torch.float32) * 3 + 1 if k1 else None
    tail = torch.randn(rows, kt * (2 if act == "silu_mul" else 1), generator=g, dtype=torch.float32) if kt else None
    w = torch.randn(40, k1 + kt, generator=g, dtype=torch.float32)
    b, r = torch.randn(40, generator=g, dtype=torch.float32), torch.randn(rows, 40, generator=g, dtype=torch.float32)
    nw = torch.randn(max(k1, 1), generator=g, dtype=torch.float32)
    nb = torch.randn(max(k1, 1), generator=g, dtype=torch.float32) if norm == "layer" else None
    spec = (norm, nw, nb, 1e-5) if norm else None
    got = gt.launch_gemv(x, w, b, r, tail, nw, nb, 1e-5, gt.NORMS[norm], gt.ACTS[act], gt.ACTS[out_act], 17,
                         config={"BLOCK_N": 16, "BLOCK_K": 64})
    want = ops.linear(x, w, b, r, norm=spec, tail=tail, act=act, out_act=out_act, out_act_from=17)
    assert rel(got, want) < 1e-5
    if rows == 1:        # the weights' blocks loaded one iteration ahead (as under PDL): the same sums
        ahead = gt.launch_gemv(x, w, b, r, tail, nw, nb, 1e-5, gt.NORMS[norm], gt.ACTS[act], gt.ACTS[out_act], 17,
                               config={"BLOCK_N": 16, "BLOCK_K": 64, "PREFETCH": True})
        assert torch.equal(ahead, got)
    if out_act:          # the activation applies to output features 17.. only, before the residual
        plain = ops.linear(x, w, b, norm=spec, tail=tail, act=act)
        gelu = torch.nn.functional.gelu(plain, approximate="tanh" if out_act == "gelu_tanh" else "none")
        assert rel(got[:, :17], plain[:, :17] + r[:, :17]) < 1e-5
        assert rel(got[:, 17:], gelu[:, 17:] + r[:, 17:]) < 1e-5
    if norm and rows == 1:              # the norm's statistics in blocks of K, as for x wider than MAX_STATS_BLOCK
        saved, gt.MAX_STATS_BLOCK = gt.MAX_STATS_BLOCK, 16
        try:
            blocks = gt.launch_gemv(x, w, b, r, tail, nw, nb, 1e-5, gt.NORMS[norm], gt.ACTS[act], gt.ACTS[out_act], 17,
                                    config={"BLOCK_N": 16, "BLOCK_K": 64})
        finally:
            gt.MAX_STATS_BLOCK = saved
        assert rel(blocks, want) < 1e-5
    v = torch.randn(rows, w.shape[1], generator=g)
    bare = gt.launch_gemv(v, w, None, None, None, None, None, 1e-5, 0, 0, config={"BLOCK_N": 8, "BLOCK_K": 32})
    assert rel(bare, v.double() @ w.double().T) < 1e-5


@pytest.mark.parametrize("bsz, heads, kv, d, rotary", [(1, 4, 4, 20, 8), (2, 4, 2, 16, 16)])
def test_rope_and_cache_write_kernel_equals_the_pytorch_path(bsz, heads, kv, d, rotary):
    g = torch.Generator().manual_seed(d)
    qkv = torch.randn(bsz, (heads + 2 * kv) * d, generator=g)
    angle = torch.rand(bsz, rotary // 2, generator=g) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    caches = [torch.randn(bsz, kv, 10, d, generator=g) for _ in range(2)]
    refs = [c.clone() for c in caches]
    slot = torch.tensor(7)
    q = at.rope_kv(qkv, cos, sin, caches[0], caches[1], slot, heads)        # CPU tensors: the interpreter
    q_ref = ops.rope_kv(qkv, cos, sin, refs[0], refs[1], slot, heads)       # CPU tensors: PyTorch
    assert rel(q, q_ref) < 1e-6
    assert rel(caches[0], refs[0]) < 1e-6 and torch.equal(caches[1], refs[1])
    assert not torch.equal(caches[0][:, :, 7], torch.zeros_like(caches[0][:, :, 7]))


def test_rope_and_cache_write_at_a_position_per_row():
    g = torch.Generator().manual_seed(3)
    bsz, heads, kv, d = 3, 4, 2, 16
    qkv = torch.randn(bsz, (heads + 2 * kv) * d, generator=g)
    angle = torch.rand(bsz, 8, generator=g) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    slots = torch.tensor([2, 9, 5])
    caches = [torch.zeros(bsz, kv, 10, d) for _ in range(2)]
    refs = [c.clone() for c in caches]
    q = at.rope_kv(qkv, cos, sin, caches[0], caches[1], slots, heads)
    q_ref = ops.rope_kv(qkv, cos, sin, refs[0], refs[1], slots, heads)
    assert rel(q, q_ref) < 1e-6 and rel(caches[0], refs[0]) < 1e-6 and torch.equal(caches[1], refs[1])
    for r, s in enumerate(slots.tolist()):              # each row wrote its own position and no other
        alone = [torch.zeros(1, kv, 10, d) for _ in range(2)]
        ops.rope_kv(qkv[r:r + 1], cos[r:r + 1], sin[r:r + 1], alone[0], alone[1], torch.tensor(s), heads)
        assert torch.equal(refs[0][r:r + 1], alone[0]) and torch.equal(refs[1][r:r + 1], alone[1])
        assert refs[1][r, :, s].abs().sum() > 0


PLANS = [None, {"split_len": 32, "block_l": 16, "warps": 1}, {"split_len": 48, "block_l": 16, "warps": 1},
         {"split_len": 512, "block_l": 64, "warps": 2}]


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("bsz, heads, kv, d, length, n_keys", [(1, 4, 4, 20, 300, 250), (2, 4, 2, 16, 200, 13)])
def test_split_kv_attention_kernel_reads_only_written_keys_and_equals_sdpa(bsz, heads, kv, d, length, n_keys, plan):
    g = torch.Generator().manual_seed(length)
    q = torch.randn(bsz, heads, d, generator=g)
    keys, values = torch.randn(bsz, kv, length, d, generator=g), torch.randn(bsz, kv, length, d, generator=g)
    mask = torch.rand(bsz, length, generator=g) < 0.8
    mask[:, n_keys:] = False
    mask[:, n_keys - 1] = True
    want = ops.decode_attention(q, keys, values, mask, torch.tensor(n_keys), d ** -0.5)
    keys[:, :, n_keys:] = float("nan")          # never read: the kernel stops at n_keys
    values[:, :, n_keys:] = float("nan")
    got = at.launch_attention(q, keys, values, mask, torch.tensor(n_keys), d ** -0.5, sms=2, plan=plan)
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("plan", PLANS[:3])
@pytest.mark.parametrize("bsz, heads, kv, d, rotary, length, slot", [
    (1, 4, 4, 20, 8, 300, 250), (2, 4, 2, 16, 16, 200, 47), (1, 2, 1, 24, 24, 64, 0), (2, 2, 2, 20, 20, 96, 95)])
def test_attend_step_kernel_equals_rotary_then_attention(bsz, heads, kv, d, rotary, length, slot, plan):
    """One kernel for rotary, cache write and attention (the new key from registers) against the
    two-step PyTorch path, with slots on and beside split boundaries (48 keys a split in one plan), GQA,
    a head size without a power-of-two tail (16) and ragged masks."""
    g = torch.Generator().manual_seed(length + slot)
    qkv = torch.randn(bsz, (heads + 2 * kv) * d, generator=g)
    angle = torch.rand(bsz, rotary // 2, generator=g) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    caches = [torch.randn(bsz, kv, length, d, generator=g) for _ in range(2)]
    mask = torch.rand(bsz, length, generator=g) < 0.7
    mask[:, slot:] = False
    mask[:, slot] = True
    refs = [c.clone() for c in caches]
    want = ops.attend(qkv, cos, sin, refs[0], refs[1], mask, torch.tensor(slot), torch.tensor(slot + 1), heads,
                      d ** -0.5)                                              # CPU: rope_kv then sdpa
    for c in caches:
        c[:, :, slot:] = float("nan")           # the slot is written, not read; later positions are never read
    got = at.launch_attend(qkv, cos, sin, caches[0], caches[1], mask, torch.tensor(slot), heads, d ** -0.5, sms=2,
                           plan=plan)
    assert rel(got, want) < 1e-5
    assert rel(caches[0][:, :, :slot + 1], refs[0][:, :, :slot + 1]) < 1e-6
    assert torch.equal(caches[1][:, :, :slot + 1], refs[1][:, :, :slot + 1])
    assert torch.isnan(caches[0][:, :, slot + 1:]).all()


@pytest.mark.parametrize("plan", PLANS[:3])
def test_split_kv_kernels_take_a_position_per_sequence_and_read_only_each_ones_keys(plan):
    """The continuous batcher's slots: each row of one buffer at its own position. Attention alone (n_keys
    per row) and the one-kernel step (slot per row, the new key written there) against the PyTorch path;
    every cache entry past a row's own keys is NaN, so a read of any would show."""
    g = torch.Generator().manual_seed(5)
    bsz, heads, d, rotary, length = 4, 4, 20, 8, 160
    slots = torch.tensor([0, 47, 159, 95])
    q = torch.randn(bsz, heads, d, generator=g)
    qkv = torch.randn(bsz, 3 * heads * d, generator=g)
    angle = torch.rand(bsz, rotary // 2, generator=g) * 6.3
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    caches = [torch.randn(bsz, heads, length, d, generator=g) for _ in range(2)]
    mask = torch.rand(bsz, length, generator=g) < 0.7
    beyond = torch.arange(length)[None] > slots[:, None]
    mask[beyond] = False
    mask[torch.arange(bsz), slots] = True
    refs = [c.clone() for c in caches]
    want_attention = ops.decode_attention(q, refs[0], refs[1], mask, slots + 1, d ** -0.5)     # CPU: sdpa
    want = ops.attend(qkv, cos, sin, refs[0], refs[1], mask, slots, slots + 1, heads, d ** -0.5)
    for c in caches:
        c.masked_fill_(beyond[:, None, :, None], float("nan"))
    got_attention = at.launch_attention(q, caches[0], caches[1], mask, slots + 1, d ** -0.5, sms=2, plan=plan)
    assert rel(got_attention, want_attention) < 1e-5
    for c in caches:
        c[torch.arange(bsz), :, slots] = float("nan")     # the step writes each row's slot before attending to it
    got = at.launch_attend(qkv, cos, sin, caches[0], caches[1], mask, slots, heads, d ** -0.5, sms=2, plan=plan)
    assert rel(got, want) < 1e-5
    written = ~beyond[:, None, :, None].expand_as(caches[0])
    assert rel(caches[0][written], refs[0][written]) < 1e-6 and torch.equal(caches[1][written], refs[1][written])


def test_attention_plan_covers_the_buffer_in_whole_key_blocks():
    for bsz, length in [(1, 1280), (1, 16640), (8, 4352), (64, 100)]:
        p = at.attention_plan(bsz, 32, length, sms=132)
        assert p["split_len"] % p["block_l"] == 0 and p["split_len"] >= p["block_l"]
        splits = -(-length // p["split_len"])
        assert splits * p["split_len"] >= length and splits <= 1024
    assert at.attention_plan(1, 32, 4352, sms=132) == {"split_len": 256, "block_l": 64, "warps": 1}   # the sweep's best


def test_split_kv_kernel_only_for_one_sequence_without_grouped_kv_heads_and_up_to_8k():
    assert ops.split_kv_applies(1, 32, 32, 4352)
    assert ops.split_kv_applies(1, 32, 32, ops.DECODE_ATTENTION_MAX_KEYS)
    assert not ops.split_kv_applies(1, 32, 32, ops.DECODE_ATTENTION_MAX_KEYS + 1)
    assert not ops.split_kv_applies(8, 32, 32, 4352)                 # batches sharing one position: sdpa
    assert ops.split_kv_applies(8, 32, 32, 4352, per_row=True)       # each row at its own: its own keys only
    assert not ops.split_kv_applies(8, 32, 8, 4352, per_row=True)
    assert not ops.split_kv_applies(1, 32, 8, 4352)                  # grouped KV heads: sdpa (enable_gqa)


@pytest.mark.parametrize("bsz, heads, groups, p, n, block_p", [(1, 4, 4, 20, 12, 8), (2, 4, 2, 24, 8, 16),
                                                                  (3, 2, 1, 16, 16, 32)])
def test_mamba_step_kernel_equals_the_pytorch_path(bsz, heads, groups, p, n, block_p):
    g = torch.Generator().manual_seed(heads * 100 + p)
    di, gn, width = heads * p, groups * n, 4
    conv_dim = di + 2 * gn
    conv_w, conv_b = torch.randn(conv_dim, width, generator=g) * 0.5, torch.randn(conv_dim, generator=g)
    dt_bias, a_log = torch.randn(heads, generator=g) - 2, torch.rand(heads, generator=g) * 2
    d_skip, norm_w = torch.randn(heads, generator=g), torch.randn(di, generator=g)
    states = [torch.randn(bsz, conv_dim, width - 1, generator=g), torch.randn(bsz, heads, p, n, generator=g)]
    refs = [t.clone() for t in states]
    for step in range(2):
        zxbcdt = torch.randn(bsz, 2 * di + 2 * gn + heads, generator=g) * 2
        got = mt.launch_mamba_step(zxbcdt, *states, conv_w, conv_b, dt_bias, a_log, d_skip, norm_w, 1e-5, groups,
                                   block_p=block_p, warps=1)
        want = ops.mamba_step(zxbcdt, *refs, conv_w, conv_b, dt_bias, a_log, d_skip, norm_w, 1e-5, groups)
        assert rel(got, want) < 1e-5, step
        assert rel(states[0], refs[0]) < 1e-6 and rel(states[1], refs[1]) < 1e-5, step


def test_dependent_launch_is_on_by_default_needs_a_gpu_and_refuses_unknown_settings(monkeypatch):
    from matvlm.ops import backend, pdl_triton

    x = torch.zeros(2)
    monkeypatch.delenv("MATVLM_PDL", raising=False)
    assert backend.dependent_launch_wanted() is True
    assert backend.dependent_launch(x) is False                  # a CPU tensor: no launch to make dependent
    monkeypatch.setenv("MATVLM_PDL", "0")
    assert backend.dependent_launch_wanted() is False
    monkeypatch.setenv("MATVLM_PDL", "yes")
    with pytest.raises(ValueError, match="MATVLM_PDL must be 0 or 1"):
        backend.dependent_launch(x)
    backend.set_dependent_launch(False)                          # the override wins over the environment
    try:
        assert backend.dependent_launch_wanted() is False and backend.dependent_launch(x) is False
    finally:
        backend.set_dependent_launch(None)
    assert pdl_triton.launch_options(False) == {"PDL": False}
    assert pdl_triton.launch_options(True) == {"PDL": True, "launch_pdl": True}
