"""Mamba2Mixer: full forward vs single steps, carried state, padding, gradients."""

import pytest
import torch

from matvlm.config import HybridConfig
from matvlm.model.cache import MambaLayerState
from matvlm.model.mixer import Mamba2Mixer


def make_mixer(ngroups=2, bias=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = HybridConfig(n_layer=1, mamba_layers=[0], d_model=16, nheads=4, headdim=6, ngroups=ngroups, d_state=5,
                       in_proj_bias=bias, out_proj_bias=bias)
    return Mamba2Mixer(cfg, 0).to(dtype)


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("ngroups", [1, 2, 4], ids=lambda g: f"G{g}")
def test_forward_over_T_equals_T_single_steps(ngroups):
    mixer = make_mixer(ngroups)
    u = torch.randn(3, 13, 16, dtype=torch.float64)
    full, _ = mixer(u)
    state = MambaLayerState()
    steps = [mixer(u[:, i:i + 1], cache=_CacheOf(state))[0] for i in range(13)]
    assert max_err(torch.cat(steps, 1), full) < 1e-10


def test_two_pieces_carrying_state_equal_one_piece():
    mixer = make_mixer()
    u = torch.randn(2, 29, 16, dtype=torch.float64)
    whole_state = MambaLayerState()
    whole, _ = mixer(u, cache=_CacheOf(whole_state))
    state = MambaLayerState()
    a, _ = mixer(u[:, :11], cache=_CacheOf(state))
    b, _ = mixer(u[:, 11:], cache=_CacheOf(state))
    assert max_err(torch.cat([a, b], 1), whole) < 1e-10
    assert max_err(state.ssm, whole_state.ssm) < 1e-10 and max_err(state.conv, whole_state.conv) < 1e-12
    assert state.seen == whole_state.seen == 29


def test_left_padding_gives_the_unpadded_outputs_and_state():
    mixer = make_mixer()
    u = torch.randn(1, 9, 16, dtype=torch.float64)
    ref_state = MambaLayerState()
    ref, _ = mixer(u, cache=_CacheOf(ref_state))
    padded = torch.cat([torch.randn(1, 4, 16, dtype=torch.float64) * 50, u], 1)   # junk in the pads
    mask = torch.tensor([[0] * 4 + [1] * 9])
    state = MambaLayerState()
    out, _ = mixer(padded, cache=_CacheOf(state), mamba_padding_mask=mask)
    assert max_err(out[:, 4:], ref) < 1e-10
    assert max_err(state.ssm, ref_state.ssm) < 1e-10 and max_err(state.conv, ref_state.conv) < 1e-12
    # ... and the next decode step continues identically
    nxt = torch.randn(1, 1, 16, dtype=torch.float64)
    assert max_err(mixer(nxt, cache=_CacheOf(state))[0],
                   mixer(nxt, cache=_CacheOf(ref_state))[0]) < 1e-10


def test_right_padding_leaves_the_final_ssm_state_untouched():
    mixer = make_mixer()
    u = torch.randn(1, 9, 16, dtype=torch.float64)
    ref_state = MambaLayerState()
    ref, _ = mixer(u, cache=_CacheOf(ref_state))
    padded = torch.cat([u, torch.randn(1, 5, 16, dtype=torch.float64)], 1)
    mask = torch.tensor([[1] * 9 + [0] * 5])
    state = MambaLayerState()
    out, _ = mixer(padded, cache=_CacheOf(state), mamba_padding_mask=mask)
    assert max_err(out[:, :9], ref) < 1e-10
    assert max_err(state.ssm, ref_state.ssm) < 1e-10


def test_a_4d_attention_mask_is_ignored_and_a_2d_one_is_used():
    mixer = make_mixer()
    u = torch.randn(1, 6, 16, dtype=torch.float64)
    full, _ = mixer(u, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    assert max_err(full, mixer(u)[0]) == 0
    masked, _ = mixer(u, attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    assert max_err(masked[:, 2:], mixer(u[:, 2:])[0]) < 1e-10


def test_gradients_match_finite_differences():
    mixer = make_mixer(ngroups=2)
    u = torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mixer(x)[0], (u,), eps=1e-6, atol=1e-5)
    mixer(u)[0].pow(2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _CacheOf(state):
    """A transformers Cache holding one MambaLayerState (layer 0)."""
    from transformers.cache_utils import Cache

    return Cache(layers=[state])


def test_the_cache_is_taken_under_either_keyword_and_refused_under_an_unknown_one():
    """transformers 5.24 renamed the cache argument `past_key_values` -> `cache`; the mixer takes both (the same
    state either way) and a cache under any other name is an error rather than a silent cache-less step."""
    mixer = make_mixer()
    u = torch.randn(2, 5, 16, dtype=torch.float64)
    a, b = MambaLayerState(), MambaLayerState()
    out_a = [mixer(u[:, :4], cache=_CacheOf(a))[0], mixer(u[:, 4:], cache=_CacheOf(a))[0]]
    out_b = [mixer(u[:, :4], past_key_values=_CacheOf(b))[0], mixer(u[:, 4:], past_key_values=_CacheOf(b))[0]]
    assert torch.equal(torch.cat(out_a, 1), torch.cat(out_b, 1)) and torch.equal(a.ssm, b.ssm)
    assert max_err(torch.cat(out_a, 1), mixer(u)[0]) < 1e-10
    with pytest.raises(TypeError, match="`kv_cache`, a keyword matvlm does not know"):
        mixer(u[:, :1], kv_cache=_CacheOf(MambaLayerState()))


def test_cache_kwarg_reads_the_installed_transformers_signature():
    import inspect

    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    from matvlm.model.cache import cache_kwarg

    for cls in (LlamaDecoderLayer, LlamaAttention):
        name = cache_kwarg(cls.__new__(cls))
        assert name in inspect.signature(cls.forward).parameters and name in ("cache", "past_key_values")


def test_an_all_real_padding_mask_gives_exactly_the_unmasked_output():
    """On a GPU the mixer keeps a padding mask without asking whether it holds padding (that would stall
    the host at every layer): masking by an all-true mask must change nothing, bit for bit."""
    mixer = make_mixer(dtype=torch.float32)
    u = torch.randn(2, 9, mixer.cfg.d_model)
    with torch.no_grad():
        plain = mixer._full(u, None, None)
        masked = mixer._full(u, torch.ones(2, 9, dtype=torch.bool), None)
    assert torch.equal(plain, masked)
