"""The Mamba-2 scan: chunked SSD and the decode step against the float64 sequential recurrence."""

import pytest
import torch

from matvlm import ops
from matvlm.ops import ssd_ref

CASES = [  # (batch, T, nheads, headdim, ngroups, dstate, chunk, with initial state)
    (1, 1, 2, 3, 1, 4, 8, False),
    (2, 37, 4, 3, 2, 5, 8, True),      # T not a multiple of the chunk, ngroups < nheads
    (2, 64, 4, 8, 4, 8, 16, True),     # T a multiple of the chunk, ngroups == nheads
    (1, 100, 6, 4, 1, 6, 64, False),   # one group shared by all heads
]
IDS = [f"B{b}-T{t}-H{h}-P{p}-G{g}-N{n}-Q{q}-{'init' if s else 'zero'}" for b, t, h, p, g, n, q, s in CASES]


def random_inputs(b, t, h, p, g, n, with_init, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x, B, C = r(b, t, h, p), r(b, t, g, n), r(b, t, g, n)
    dt = torch.rand(b, t, h, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 3 - 0.1
    D = r(h)
    s0 = r(b, h, p, n) if with_init else None
    return [v.to(dtype) if v is not None else None for v in (x, dt, A, B, C, D, s0)]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("b,t,h,p,g,n,q,init", CASES, ids=IDS)
def test_chunked_equals_sequential_float64(b, t, h, p, g, n, q, init):
    x, dt, A, B, C, D, s0 = random_inputs(b, t, h, p, g, n, init)
    y_ref, f_ref = ssd_ref.ssd_sequential(x, dt, A, B, C, D, s0)
    y, f = ssd_ref.ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=q)
    assert max_err(y, y_ref) < 1e-10, f"y max err {max_err(y, y_ref)}"
    assert max_err(f, f_ref) < 1e-10, f"final state max err {max_err(f, f_ref)}"


@pytest.mark.parametrize("b,t,h,p,g,n,q,init", CASES[1:3], ids=IDS[1:3])
def test_chunked_gradients_equal_sequential(b, t, h, p, g, n, q, init):
    inputs = random_inputs(b, t, h, p, g, n, init, seed=1)
    leaves = [v.clone().requires_grad_(True) for v in inputs]
    gen = torch.Generator().manual_seed(5)
    wy = torch.randn(b, t, h, p, generator=gen, dtype=torch.float64)
    wf = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)

    def grads(fn, **kw):
        for v in leaves:
            v.grad = None
        y, f = fn(*leaves, **kw)
        ((y * wy).sum() + (f * wf).sum()).backward()
        return [v.grad.clone() for v in leaves]

    g_ref = grads(ssd_ref.ssd_sequential)
    g_chk = grads(ssd_ref.ssd_chunked, chunk_size=q)
    for name, a, r in zip("x dt A B C D s0".split(), g_chk, g_ref):
        assert max_err(a, r) < 1e-9, f"d{name} max err {max_err(a, r)}"


@pytest.mark.parametrize("b,t,h,p,g,n,q,init", CASES[1:3], ids=IDS[1:3])
def test_step_equals_sequential(b, t, h, p, g, n, q, init):
    x, dt, A, B, C, D, s0 = random_inputs(b, t, h, p, g, n, True)
    y_ref, f_ref = ssd_ref.ssd_sequential(x, dt, A, B, C, D, s0)
    state = s0.clone()
    ys = [ssd_ref.ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i], D) for i in range(t)]
    assert max_err(torch.stack(ys, 1), y_ref) < 1e-12
    assert max_err(state, f_ref) < 1e-12


def test_two_pieces_with_carried_state_equal_one_piece():
    x, dt, A, B, C, D, s0 = random_inputs(2, 50, 4, 3, 2, 5, True, seed=3)
    y_all, f_all = ssd_ref.ssd_chunked(x, dt, A, B, C, D, s0, chunk_size=16)
    y1, f1 = ssd_ref.ssd_chunked(x[:, :21], dt[:, :21], A, B[:, :21], C[:, :21], D, s0, chunk_size=16)
    y2, f2 = ssd_ref.ssd_chunked(x[:, 21:], dt[:, 21:], A, B[:, 21:], C[:, 21:], D, f1, chunk_size=16)
    assert max_err(torch.cat([y1, y2], 1), y_all) < 1e-10
    assert max_err(f2, f_all) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_low_precision_inputs_within_tolerance(dtype, tol):
    x, dt, A, B, C, D, s0 = random_inputs(2, 70, 4, 8, 2, 8, True, seed=4)
    y_ref, f_ref = ssd_ref.ssd_sequential(x, dt, A, B, C, D, s0)
    args = [v.to(dtype) for v in (x, dt, A, B, C, D, s0)]
    y, f = ssd_ref.ssd_chunked(*args, chunk_size=32)
    assert y.dtype == dtype
    rel = (y.double() - y_ref).norm() / y_ref.norm()
    rel_f = (f.double() - f_ref).norm() / f_ref.norm()
    assert rel < tol and rel_f < tol, f"relative error y {rel:.2e}, state {rel_f:.2e}"


def test_shape_errors_name_the_argument():
    x, dt, A, B, C, D, _ = random_inputs(1, 5, 4, 3, 3, 5, False)
    with pytest.raises(ValueError, match="ngroups"):
        ssd_ref.ssd_chunked(x, dt, A, B, C, D)
    x, dt, A, B, C, D, _ = random_inputs(1, 5, 4, 3, 2, 5, False)
    with pytest.raises(ValueError, match="dt must be"):
        ssd_ref.ssd_chunked(x, dt[:, :4], A, B, C, D)


def test_gated_rmsnorm_matches_its_formula():
    gen = torch.Generator().manual_seed(0)
    y, z, w = torch.randn(2, 3, 12, generator=gen), torch.randn(2, 3, 12, generator=gen), torch.randn(12, generator=gen)
    out = ssd_ref.gated_rmsnorm_ref(y, z, w, eps=1e-5, group_size=4)
    g = (y * torch.sigmoid(z) * z).view(2, 3, 3, 4)
    expect = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(2, 3, 12) * w
    assert max_err(out, expect) < 1e-6


def test_dispatch_runs_the_reference_on_cpu(monkeypatch):
    x, dt, A, B, C, D, s0 = random_inputs(1, 10, 2, 3, 1, 4, True)
    monkeypatch.setenv("MATVLM_KERNELS", "auto")
    assert ops.backend_for(x) == "torch"
    y, f = ops.ssd(x, dt, A, B, C, D, s0)
    y_ref, f_ref = ssd_ref.ssd_sequential(x, dt, A, B, C, D, s0)
    assert max_err(y, y_ref) < 1e-10 and max_err(f, f_ref) < 1e-10


def test_forcing_triton_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setenv("MATVLM_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="Triton path is unavailable"):
        ops.backend_for(torch.zeros(1))
    monkeypatch.setenv("MATVLM_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        ops.backend_for(torch.zeros(1))
