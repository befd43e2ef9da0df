"""sparse_distill_loss: k = V equals the dense loss (values and gradients, every kind); the k + 1 bucket
semantics on a hand-checked case; the given tail equals the derived one; bad indices."""

import math

import pytest
import torch

from adaswitch._validation import KINDS
from adaswitch.ops import distill_loss, sparse_distill_loss, topk_teacher_logprobs


def _grad(fn, s):
    x = s.clone().requires_grad_()
    loss = fn(x)
    loss.sum().backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equals_vocab_is_dense(kind, temperature):
    s = torch.randn(2, 3, 23, dtype=torch.float64) * 2
    t = torch.randn(2, 3, 23, dtype=torch.float64) * 2
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    kw = dict(beta=0.3, alpha=0.2, temperature=temperature, labels=labels)
    sparse = topk_teacher_logprobs(t, 23, temperature=temperature)
    ours = _grad(lambda x: sparse_distill_loss(x, sparse.logprobs, sparse.indices, kind, **kw), s)
    dense = _grad(lambda x: distill_loss(x, t, kind, impl="torch", **kw), s)
    torch.testing.assert_close(ours[0], dense[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], dense[1], rtol=1e-9, atol=1e-12)


def test_bucket_semantics_by_hand():
    """V = 4, teacher top-2 = ids (2, 0): buckets {2}, {0}, tail {1, 3}; forward KL over the 3 buckets."""
    s = torch.tensor([[0.5, -1.0, 2.0, 0.1]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.2, 3.0, -2.0]], dtype=torch.float64)
    sp = topk_teacher_logprobs(t, 2)
    assert sp.indices.tolist() == [[2, 0]]
    ps, pt = s.softmax(-1)[0], t.softmax(-1)[0]
    qs = torch.stack([ps[2], ps[0], ps[1] + ps[3]])
    qt = torch.stack([pt[2], pt[0], pt[1] + pt[3]])
    expected = (qt * (qt / qs).log()).sum()
    for tail in (None, sp.tail_logprobs):
        got = sparse_distill_loss(s, sp.logprobs, sp.indices, teacher_tail_logprobs=tail)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert math.isclose(sp.tail_logprobs.exp().item(), (pt[1] + pt[3]).item(), rel_tol=1e-12)


def _bucket_divergence(s, sp, kind, beta=0.5, alpha=0.1):
    """float64 [N]: the divergence between the (k + 1)-bucket distributions, written out by hand from the
    definitions (probabilities, not log-probabilities; 0 log 0 = 0, +inf where p > 0 meets q = 0)."""
    ps = torch.softmax(s.double(), -1)
    top = ps.gather(-1, sp.indices)
    outside = torch.ones_like(ps, dtype=torch.bool).scatter(-1, sp.indices, False)
    qs = torch.cat([top, (ps * outside).sum(-1, keepdim=True)], -1)
    qt = torch.cat([sp.logprobs.double().exp(), sp.tail_logprobs.double().exp()[:, None]], -1)

    def kl(p, q):
        ratio = torch.where(p > 0, p / q, torch.ones_like(p))
        return (p * ratio.log()).sum(-1)

    return {
        "forward_kl": lambda: kl(qt, qs),
        "reverse_kl": lambda: kl(qs, qt),
        "jsd": lambda: beta * kl(qt, beta * qt + (1 - beta) * qs) + (1 - beta) * kl(qs, beta * qt + (1 - beta) * qs),
        "tvd": lambda: 0.5 * (qt - qs).abs().sum(-1),
        "skew_forward_kl": lambda: kl(qt, alpha * qt + (1 - alpha) * qs),
        "skew_reverse_kl": lambda: kl(qs, alpha * qs + (1 - alpha) * qt),
    }[kind]()


@pytest.mark.parametrize("kind", KINDS)
def test_small_k_bf16_values_and_gradients(kind):
    """bf16 student, k = 5 of 50: per-row values and gradients against the bucket divergence computed by
    hand in float64 on the same rounded inputs. Row 0's student has mass on 5 ids only, so a teacher bucket
    it leaves empty makes forward KL +inf there (and only there); every other value is finite."""
    gen = torch.Generator().manual_seed(1)
    s = (torch.randn(6, 50, generator=gen) * 3).bfloat16()
    t = torch.randn(6, 50, generator=gen) * 3
    s[0, :45] = float("-inf")  # the student puts no mass outside a few ids
    sp = topk_teacher_logprobs(t, 5)
    assert not set(sp.indices[0].tolist()) <= set(range(45, 50))  # row 0 leaves a teacher bucket empty
    rows = sparse_distill_loss(s, sp.logprobs, sp.indices, kind, teacher_tail_logprobs=sp.tail_logprobs,
                               reduction="none")
    want = _bucket_divergence(s, sp, kind)
    assert rows.dtype == torch.float32
    assert torch.isinf(want).tolist() == [kind == "forward_kl"] + [False] * 5
    assert torch.equal(torch.isinf(rows), torch.isinf(want))
    torch.testing.assert_close(rows.double()[1:], want[1:], rtol=2e-5, atol=1e-6)
    if kind != "forward_kl":
        torch.testing.assert_close(rows.double()[0], want[0], rtol=2e-5, atol=1e-6)
    # gradients over the finite rows (row 0 ignored where its loss is +inf), against float64 autograd
    labels = torch.tensor([-100 if kind == "forward_kl" else 0, 0, 0, 0, 0, 0])
    loss, grad = _grad(
        lambda x: sparse_distill_loss(x, sp.logprobs, sp.indices, kind, teacher_tail_logprobs=sp.tail_logprobs,
                                      labels=labels),
        s,
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    x = s.double().requires_grad_()
    keep = labels != -100
    (_bucket_divergence(x, sp, kind)[keep].sum() / keep.sum()).backward()
    assert torch.isfinite(grad.float()).all()
    torch.testing.assert_close(grad.double(), torch.nan_to_num(x.grad), rtol=2e-2, atol=1e-4)


def test_all_ignored_zero():
    s = torch.randn(3, 10).requires_grad_()
    sp = topk_teacher_logprobs(torch.randn(3, 10), 4)
    loss = sparse_distill_loss(s, sp.logprobs, sp.indices, "jsd", labels=torch.full((3,), -100))
    loss.backward()
    assert loss.item() == 0 and not s.grad.any()


@pytest.mark.parametrize(
    "idx,err,match",
    [
        (torch.tensor([[0, 10]]), ValueError, r"in \[0, 10\)"),
        (torch.tensor([[-1, 3]]), ValueError, r"in \[0, 10\)"),
        (torch.tensor([[3, 3]]), ValueError, "repeat"),
        (torch.tensor([[0.0, 3.0]]), TypeError, "teacher_indices must be an int64"),
        (torch.tensor([[0, 1, 2]]), ValueError, "teacher_indices must have"),
    ],
)
def test_bad_indices(idx, err, match):
    with pytest.raises(err, match=match):
        sparse_distill_loss(torch.randn(1, 10), torch.full((1, 2), -1.0), idx)


def test_bad_shapes_and_k():
    with pytest.raises(ValueError, match="teacher_logprobs must be"):
        sparse_distill_loss(torch.randn(2, 10), torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="k must be"):
        topk_teacher_logprobs(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="teacher_tail_logprobs"):
        sparse_distill_loss(
            torch.randn(2, 10),
            torch.zeros(2, 2),
            torch.tensor([[0, 1], [0, 1]]),
            teacher_tail_logprobs=torch.zeros(3),
        )
