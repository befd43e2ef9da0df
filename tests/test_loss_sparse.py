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


@pytest.mark.parametrize("kind", KINDS)
def test_small_k_finite_gradients_bf16(kind):
    s = (torch.randn(6, 50) * 3).bfloat16()
    t = torch.randn(6, 50) * 3
    s[0, :45] = float("-inf")  # the student puts no mass outside a few ids
    sp = topk_teacher_logprobs(t, 5)
    loss, grad = _grad(
        lambda x: sparse_distill_loss(
            x, sp.logprobs, sp.indices, kind, teacher_tail_logprobs=sp.tail_logprobs
        ),
        s,
    )
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    if kind not in ("reverse_kl", "forward_kl"):  # these two may be +inf when a side has an empty bucket
        assert torch.isfinite(loss) and torch.isfinite(grad.float()).all()


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
