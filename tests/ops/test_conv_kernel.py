"""The Mamba-2 mixer's causal convolution kernel (ops/conv_triton.py), run by Triton's interpreter on the
CPU, against float64 and its PyTorch twin: tiles that do not fill, cached previous inputs, a strided input
(a slice of the projection), no bias, bfloat16; and the dispatcher keeps autograd on the PyTorch path."""

import pytest
import torch

from matvlm import ops
from matvlm.ops import conv as conv_ops, conv_triton


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


def test_the_dispatcher_takes_the_kernel_only_without_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(conv_ops, "fused_kernels", lambda module, x: calls.append(module) or conv_triton)
    x, w, b = torch.randn(1, 9, 8), torch.randn(8, 4), torch.randn(8)
    with torch.no_grad():
        fast = ops.causal_conv1d(x, w, b)
    assert calls == ["conv_triton"]
    w.requires_grad_(True)
    slow = ops.causal_conv1d(x, w, b)                                  # training: autograd through F.conv1d
    assert calls == ["conv_triton"] and slow.requires_grad
    assert torch.allclose(fast, slow.detach(), atol=1e-5)
