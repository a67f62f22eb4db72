"""The Mamba-2 mixer's causal convolution kernels (ops/conv_triton.py), run by Triton's interpreter on the
CPU, against float64 and their PyTorch twin: tiles that do not fill, cached previous inputs, a strided input
(a slice of the projection), no bias, bfloat16; the backward's three gradients against float64 autograd; and
the dispatcher's choice (the training kernels only without cached inputs)."""

import pytest
import torch

from matvlm import ops
from matvlm.ops import conv as conv_ops
from matvlm.ops import conv_triton


def _float64(x, w, b, state, silu=True):
    k = w.shape[1]
    xs = torch.cat([state.transpose(1, 2) if state is not None else torch.zeros(x.shape[0], k - 1, x.shape[2]),
                    x], 1).double()                                    # (B, K-1+T, C)
    y = sum(xs[:, j:j + x.shape[1]] * w[:, j].double() for j in range(k))
    y = y + (b.double() if b is not None else 0)
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("bsz, t, c, k, state, bias, dtype", [
    (2, 37, 50, 4, False, True, torch.float32), (1, 70, 130, 4, True, True, torch.float32),
    (3, 5, 20, 4, True, False, torch.float32), (1, 2, 16, 3, True, True, torch.float32),
    (2, 33, 40, 4, True, True, torch.bfloat16)])
def test_causal_conv_kernel_equals_float64_and_the_pytorch_path(bsz, t, c, k, state, bias, dtype):
    g = torch.Generator().manual_seed(t * c)
    proj = torch.randn(bsz, t, c + 9, generator=g).to(dtype)          # x is a slice of a wider projection
    x = proj[:, :, 3:3 + c]
    w = torch.randn(c, k, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    s = torch.randn(bsz, c, k - 1, generator=g).to(dtype) if state else None
    got = conv_triton.causal_conv1d(x, w, b, s, block_t=16, block_c=32)
    want = _float64(x, w, b, s)
    ref = conv_ops.causal_conv1d_ref(x, w, b, s)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (bsz, t, c) and got.dtype == dtype
    assert ((got.double() - want).norm() / want.norm()).item() < tol
    assert ((ref.double() - want).norm() / want.norm()).item() < tol
    plain = conv_triton.causal_conv1d(x, w, b, s, silu=False, block_t=16, block_c=32)
    assert ((plain.double() - _float64(x, w, b, s, silu=False)).norm() / plain.double().norm()).item() < tol


@pytest.mark.parametrize("bsz, t, c, bias, silu, dtype", [
    (2, 37, 50, True, True, torch.float32), (1, 70, 130, False, True, torch.float32),
    (3, 3, 20, True, False, torch.float32), (2, 33, 40, True, True, torch.bfloat16)])
def test_causal_conv_backward_kernels_equal_float64_autograd(bsz, t, c, bias, silu, dtype):
    g = torch.Generator().manual_seed(t + c)
    proj = torch.randn(bsz, t, c + 9, generator=g).to(dtype)
    x = proj[:, :, 3:3 + c]
    w = torch.randn(c, 4, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    dy = torch.randn(bsz, t, c, generator=g).to(dtype)
    leaves = [v.double().requires_grad_(True) for v in (x, w) + ((b,) if bias else ())]
    y = _float64(leaves[0], leaves[1], leaves[2] if bias else None, None, silu)
    want = torch.autograd.grad((y * dy.double()).sum(), leaves)
    dx, dw, db = conv_triton.causal_conv1d_backward(x, w, b, dy, silu, block_t=16, block_c=32)
    assert dx.shape == x.shape and dx.dtype == dtype and dw.shape == w.shape and (db is None) == (not bias)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, ref in zip((dx, dw, db), want):
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol
    # through autograd: the Function hands each input its gradient
    leaves = [v.detach().requires_grad_(True) for v in (x, w) + ((b,) if bias else ())]
    out = conv_triton.causal_conv1d_train(leaves[0], leaves[1], leaves[2] if bias else None, silu)
    grads = torch.autograd.grad(out, leaves, dy)
    for got, ref in zip(grads, want):
        assert got.dtype == dtype and ((got.double() - ref).norm() / ref.norm()).item() < tol


def test_the_dispatcher_takes_the_training_kernels_only_without_cached_inputs(monkeypatch):
    calls = []
    monkeypatch.setattr(conv_ops, "fused_kernels", lambda module, x: calls.append(module) or conv_triton)
    monkeypatch.setattr(conv_triton, "causal_conv1d_train",
                        lambda *a, **k: calls.append("train") or conv_triton._CausalConv.apply(*a, **k))
    x, w, b = torch.randn(1, 9, 8), torch.randn(8, 4), torch.randn(8)
    with torch.no_grad():
        fast = ops.causal_conv1d(x, w, b)
    assert calls == ["conv_triton"]
    w.requires_grad_(True)
    trained = ops.causal_conv1d(x, w, b)                              # training: the kernels and their backward
    assert calls == ["conv_triton", "conv_triton", "train"] and trained.requires_grad
    assert torch.allclose(fast, trained.detach(), atol=1e-5)
    state = torch.randn(1, 8, 3)
    slow = ops.causal_conv1d(x, w, b, state)                          # cached inputs with autograd: F.conv1d
    assert calls[-1] == "conv_triton" and slow.requires_grad
    assert torch.allclose(slow.detach(), conv_ops.causal_conv1d_ref(x, w.detach(), b, state), atol=1e-5)
