"""Each loss against a computation by hand on small tensors."""

import math

import pytest
import torch

from matvlm.distill import losses


def test_kl_matches_hand_computation_with_temperature():
    s = torch.tensor([[[1.0, 0.0, -1.0]]])
    t = torch.tensor([[[0.0, 2.0, 0.0]]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 0.0, -1.0)]
    pt = [math.exp(v / T) for v in (0.0, 2.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    expected = T ** 2 * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert abs(losses.kl_per_token(s, t, T).item() - expected) < 1e-6
    assert losses.kl_per_token(t, t, T).abs().item() < 1e-7          # zero against itself


def test_layer_distance_is_the_per_token_l2_norm():
    s = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    assert torch.allclose(losses.layer_distance_per_token(s, t), torch.tensor([[5.0, 0.0]]))
    assert torch.allclose(losses.layer_sq_distance_per_token(s, t), torch.tensor([[25.0, 0.0]]))


def test_ce_predicts_the_next_answer_token_only():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))
    labels = torch.tensor([[-100, 1, 2]])             # answer tokens at positions 1 and 2
    ce = losses.ce_per_token(logits, labels)
    # position 0 predicts label[1]=1 with p=0.25; position 1 predicts label[2]=2 with p=0.1; position 2 nothing
    assert torch.allclose(ce, torch.tensor([[-math.log(0.25), -math.log(0.1), 0.0]]), atol=1e-6)
    assert losses.answer_mask(labels).tolist() == [[True, True, False]]


def test_reduce_sum_excludes_padding():
    per_token = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    assert losses.reduce_sum(per_token, mask).item() == 6.0


def test_upstream_sum_form_equals_kl_div_batchmean():
    """loss_reduction='sum' reproduces F.kl_div(log_softmax(s/T), softmax(t/T), 'batchmean') * T^2."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    T = 1.5
    upstream = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.softmax(t / T, -1),
                                          reduction="batchmean") * T ** 2
    ours = losses.reduce_sum(losses.kl_per_token(s, t, T), torch.ones(3, 5, dtype=torch.bool)) / 3
    assert torch.allclose(ours, upstream, atol=1e-6)
    # and the Frobenius layer term
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    frob = losses.reduce_sum(losses.layer_sq_distance_per_token(a, b), torch.ones(3, 5, dtype=torch.bool)).sqrt()
    assert torch.allclose(frob, torch.norm(a - b, p=2), atol=1e-5)


@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen-head", "trainable-head-with-bias"])
def test_chunked_head_losses_equal_the_full_logits_losses_and_their_gradients_in_float64(trainable_head):
    torch.manual_seed(0)
    B, T, D, V, temp = 3, 7, 5, 11, 2.0
    head = torch.nn.Linear(D, V, bias=trainable_head).double()
    t_head = torch.nn.Linear(D, V, bias=trainable_head).double()
    head.requires_grad_(trainable_head)
    h_s = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(B, T, D, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False                                              # padding
    labels = torch.randint(0, V, (B, T))
    labels[:, :3] = -100                                             # prompt tokens
    labels[~mask] = -100

    def reference():
        s, t = head(h_s), t_head(h_t)
        kl = losses.reduce_sum(losses.kl_per_token(s, t, temp).double(), mask)
        ce = losses.reduce_sum(losses.ce_per_token(s.double(), labels).double(), losses.answer_mask(labels) & mask)
        return kl, ce

    def chunked():
        return losses.head_losses(h_s, h_t, head, t_head, labels, mask, temp, want_kl=True, want_ce=True, chunk=4)

    def chunked_given_rows():                                        # the rows the training loop finds on the host
        return losses.head_losses(h_s, h_t, head, t_head, labels, mask, temp, want_kl=True, want_ce=True, chunk=4,
                                  rows=mask.reshape(-1).nonzero().squeeze(1))

    results = []
    for fn in (reference, chunked, chunked_given_rows):
        kl, ce = fn()
        params = [h_s] + ([head.weight, head.bias] if trainable_head else [])
        grads = torch.autograd.grad(0.7 * kl + 1.3 * ce, params)
        results.append((kl.detach(), ce.detach(), grads))
    (kl_r, ce_r, g_r), (kl_c, ce_c, g_c), (kl_g, ce_g, g_g) = results
    assert torch.equal(kl_g, kl_c) and torch.equal(ce_g, ce_c) and all(torch.equal(a, b) for a, b in zip(g_g, g_c))
    assert torch.allclose(kl_c.double(), kl_r, atol=1e-5), (kl_c, kl_r)    # sums kept in float32
    assert torch.allclose(ce_c.double(), ce_r, atol=1e-5), (ce_c, ce_r)
    for a, b in zip(g_c, g_r):
        assert torch.allclose(a.double(), b, atol=1e-5), (a - b).abs().max()
    assert g_c[0][1, 4:].abs().max() == 0                            # padding gets no gradient


def test_chunked_head_losses_take_kl_alone_without_labels():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 9, bias=False)
    h = torch.randn(2, 5, 4)
    kl, _ = losses.head_losses(h, h, head, want_kl=True, want_ce=False, chunk=3)
    assert kl.abs().item() < 1e-6                                    # a model against itself
    kl, _ = losses.head_losses(h, torch.randn(2, 5, 4), head, want_kl=True, want_ce=False)
    assert kl.item() > 0
