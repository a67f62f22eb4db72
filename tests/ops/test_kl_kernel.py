"""The distillation loss's KL kernel (ops/kl_triton.py), run by Triton's interpreter on the CPU, against
float64: per-row T²·KL and its gradient, for vocabularies that do and do not fill the kernel's blocks,
temperatures, large logits and bfloat16 inputs; and the chunked LM-head losses taking the kernel."""

import pytest
import torch

from matvlm.distill import losses
from matvlm.ops import kl as kl_ops, kl_triton


def _float64(s, t, temp):
    s, t = s.double(), t.double()
    s.requires_grad_(True)
    log_ps, log_pt = torch.log_softmax(s / temp, -1), torch.log_softmax(t / temp, -1)
    kl = temp ** 2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    (grad,) = torch.autograd.grad(kl.sum(), s)
    return kl.detach(), grad


@pytest.mark.parametrize("rows, vocab, temp, scale, dtype", [
    (3, 2048, 1.0, 3.0, torch.float32), (4, 3001, 2.0, 3.0, torch.float32), (2, 5000, 1.0, 40.0, torch.float32),
    (1, 7, 0.5, 1.0, torch.float32), (3, 4100, 1.0, 5.0, torch.bfloat16)])
def test_kl_kernel_equals_float64(rows, vocab, temp, scale, dtype):
    g = torch.Generator().manual_seed(vocab)
    s = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    t = (torch.randn(rows, vocab, generator=g) * scale).to(dtype)
    t[0, :vocab // 2] = s[0, :vocab // 2]                     # rows near and far from each other
    kl, ds = kl_triton.kl_and_grad(s, t, temp)
    want_kl, want_ds = _float64(s, t, temp)
    assert ds.dtype == dtype and kl.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2             # bf16: the gradient is stored in bf16
    assert torch.allclose(kl.double(), want_kl, rtol=1e-4, atol=1e-5), (kl, want_kl)
    assert ((ds.double() - want_ds).norm() / want_ds.norm()).item() < tol
    ref_kl, ref_ds = kl_ops.kl_and_grad_ref(s, t, temp)       # and the PyTorch twin the CPU path uses
    assert torch.allclose(ref_kl.double(), want_kl, rtol=1e-4, atol=1e-5)
    assert ((ref_ds.double() - want_ds).norm() / want_ds.norm()).item() < 1e-5


def test_identical_rows_have_zero_kl_and_gradient():
    s = torch.randn(2, 3000)
    kl, ds = kl_triton.kl_and_grad(s, s.clone(), 1.0)
    assert kl.abs().max() < 1e-5 and ds.abs().max() < 1e-6


def test_chunked_head_losses_through_the_kernel_equal_the_pytorch_path(monkeypatch):
    torch.manual_seed(0)
    head, t_head = torch.nn.Linear(6, 300, bias=True), torch.nn.Linear(6, 300, bias=True)
    h_s = torch.randn(2, 9, 6, requires_grad=True)
    h_t = torch.randn(2, 9, 6)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    results = []
    for use_kernel in (False, True):
        if use_kernel:
            monkeypatch.setattr(losses, "kl_and_grad", kl_triton.kl_and_grad)
        kl, _ = losses.head_losses(h_s, h_t, head, t_head, mask=mask, temperature=1.5, chunk=5)
        (grad,) = torch.autograd.grad(kl, h_s)
        results.append((kl.detach(), grad))
    (kl_a, g_a), (kl_b, g_b) = results
    assert torch.allclose(kl_a, kl_b, rtol=1e-5) and torch.allclose(g_a, g_b, atol=1e-6)
    assert g_b[1, 5:].abs().max() == 0
