"""The paper's Eq. 4-6: a converted layer's SSM, with decay 1, dt = 1, D = 0 and no conv/gate/norm,
is causal linear attention (no softmax, no 1/sqrt(d)) with the teacher's W_Q, W_K, W_V."""

import pytest
import torch

from matvlm.convert.init import in_proj_rows, init_from_attention
from matvlm.model.hybrid import attention_names, attention_shape, hybrid_config_for, make_hybrid
from matvlm.ops import ssd_ref
from matvlm.toy.tiny import tiny_causal_lm

FAMILIES = {"phi-mha-bias": ("phi", None), "llama-gqa": ("llama", 2), "qwen2-gqa-bias": ("qwen2", 2)}


def linear_attention(q, k, v):
    """y_n = sum_{t<=n} (q_n . k_t) v_t per head. q: (B,T,H,d), k, v: (B,T,H,d)."""
    scores = torch.einsum("bnhd,bthd->bhnt", q, k).tril()
    return torch.einsum("bhnt,bthd->bnhd", scores, v)


@pytest.mark.parametrize("name", FAMILIES)
def test_converted_ssm_is_linear_attention_of_the_teacher(name):
    family, kv = FAMILIES[name]
    model, _ = tiny_causal_lm(family, n_layer=2, hidden=48, heads=4, kv_heads=kv, seed=3)
    model = model.double()
    heads, kv_heads, hd = attention_shape(model.config)
    cfg = hybrid_config_for(model, [1])
    replaced = make_hybrid(model, cfg)
    attn, mixer = replaced[1], model.mamba_mixers[1]
    init_from_attention(mixer, attn, attention_names(model.config), heads, kv_heads)

    u = torch.randn(2, 11, 48, dtype=torch.float64)
    _, xbc, _ = mixer.split_projection(mixer.in_proj(u))
    x, B, C = mixer.split_xbc(xbc)                                # conv and its activation bypassed
    y, _ = ssd_ref.ssd_sequential(
        x.view(2, 11, heads, hd), torch.ones(2, 11, heads, dtype=torch.float64),   # dt = 1
        torch.zeros(heads, dtype=torch.float64),                                    # A = 0: decay 1
        B.view(2, 11, heads, hd), C.view(2, 11, heads, hd), D=None)                 # D = 0

    names = attention_names(model.config)
    rep = heads // kv_heads
    q = getattr(attn, names.q)(u).view(2, 11, heads, hd)
    k = getattr(attn, names.k)(u).view(2, 11, kv_heads, hd).repeat_interleave(rep, dim=2)
    v = getattr(attn, names.v)(u).view(2, 11, kv_heads, hd).repeat_interleave(rep, dim=2)
    expected = linear_attention(q, k, v)
    assert (y - expected).abs().max() < 1e-9 * expected.abs().max()
    # and the output projection is the teacher's
    assert torch.equal(mixer.out_proj.weight, getattr(attn, names.o).weight)
    assert (mixer.out_proj.bias is None) == (getattr(attn, names.o).bias is None)


def test_rows_of_the_fused_projection_are_named_and_disjoint():
    model, _ = tiny_causal_lm("phi", n_layer=1, hidden=32, heads=2, seed=0)
    make_hybrid(model, hybrid_config_for(model, [0]))
    rows = in_proj_rows(model.mamba_mixers[0])
    assert list(rows) == ["z_rows", "x_rows", "B_rows", "C_rows", "dt_rows"]
    assert rows["dt_rows"].stop == model.mamba_mixers[0].in_proj.out_features
    assert all(a.stop == b.start for a, b in zip(list(rows.values()), list(rows.values())[1:]))


def test_hybridize_is_make_hybrid_then_the_attention_init_and_repeats_under_a_seed():
    from matvlm.convert.init import hybridize

    def fresh():
        return tiny_causal_lm("llama", n_layer=3, hidden=48, heads=4, kv_heads=2, seed=3)[0]

    a, b, c = fresh(), fresh(), fresh()
    replaced = hybridize(a, [0, 2], seed=7)
    assert sorted(replaced) == [0, 2] and a.hybrid_config.mamba_layers == [0, 2]
    v_rows = in_proj_rows(a.mamba_mixers[2])["x_rows"]
    v = replaced[2].v_proj.weight.reshape(2, 12, 48).repeat_interleave(2, dim=0)   # (kv, hd, d) -> 4 heads
    assert torch.equal(a.mamba_mixers[2].in_proj.weight[v_rows], v.reshape(-1, 48))
    hybridize(b, hybrid_config_for(b, [0, 2]), seed=7)                  # a ready config: the same model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    hybridize(c, [0, 2], seed=7, init=False)                            # weights to be loaded later
    assert not torch.equal(c.mamba_mixers[2].in_proj.weight[v_rows], v.reshape(-1, 48))
