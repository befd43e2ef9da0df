"""The loss forms beyond the token-mean divergence: the hard-label term (Liger's weight_hard_loss /
weight_soft_loss), reduction="sequence_mean", and the sampled-token policy-gradient form
(kind="sampled_reverse_kl"), on every implementation, against the float64 autograd reference, Liger's
fused-linear JSD and TRL's generalized_jsd_loss; the sampled form's gradient is also checked to be, in
expectation, the reverse KL's.

Tolerances as in tests/test_loss.py: float64 on the PyTorch / native paths 1e-10; float32 accumulation
1e-5 relative to the largest entry; bf16 / fp16 inputs 1/128 / 1/1024 for the gradient (one rounding).
"""

import pytest
import torch

from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch._validation import KINDS
from adaswitch.kernels.triton.launch import max_block
from adaswitch.ops import DistillLoss, distill_loss, fused_linear_distill_loss, sampled_token_loss
from adaswitch.ops.loss import reference_distill_loss

IMPLS = (
    ["torch"]
    + (["native"] if native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
    + (["triton"] if triton_available(torch.device("cpu")) else [])
)
B, L, V = 3, 7, 37  # odd sizes; V = 37 runs over three 16-entry tiles under max_block(16)


def _inputs(dtype=torch.float64, v=V, scale=3.0):
    s = torch.randn(B, L, v, dtype=torch.float64) * scale
    t = torch.randn(B, L, v, dtype=torch.float64) * scale
    s[..., 4] = t[..., 4] = float("-inf")  # a vocabulary entry neither model can emit
    labels = torch.randint(0, v, (B, L))
    labels[labels == 4] = 5
    labels[0, 5:] = -100  # a shorter sequence
    labels[2, 0] = -100
    return s.to(dtype), t.to(dtype), labels


def _tol(dtype, impl):
    if dtype == torch.float64 and impl != "triton":
        return 1e-10, 1e-10
    if dtype == torch.bfloat16:
        return 1e-5, 1 / 128
    if dtype == torch.float16:
        return 1e-5, 1 / 1024  # one fp16 rounding of the gradient
    return 1e-5, 1e-5


def _run(fn, s, *args, **kw):
    x = s.detach().clone().requires_grad_()
    loss = fn(x, *args, **kw)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss.double() * weights).sum().backward()
    return loss.detach().double(), x.grad.double()


def _check(ours, ref, tol):
    (lo, go), (lr, gr) = ours, ref
    lt, gt = tol
    assert torch.allclose(lo, lr, rtol=lt, atol=lt * max(1.0, lr.abs().max().item())), (lo, lr)
    err = (go - gr).abs().max().item()
    assert err <= gt * max(1e-3, gr.abs().max().item()), err


def _compare(impl, dtype, kind, **kw):
    s, t, labels = _inputs(dtype)
    kw.setdefault("labels", labels)
    with max_block(16):
        ours = _run(distill_loss, s, t, kind, impl=impl, **kw)
    ref = _run(reference_distill_loss, s.double(), t.double(), kind, **kw)
    _check(ours, ref, _tol(dtype, impl))
    return ours


# ----------------------------------------------------------------------------------------------------------
# the hard-label term


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_hard_label_term_matches_reference(impl, kind, temperature):
    _compare(impl, torch.float64 if impl != "triton" else torch.float32, kind, temperature=temperature,
             weight_hard_loss=0.3, weight_soft_loss=0.7, beta=0.4, alpha=0.2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hard_label_term_dtypes(impl, dtype):
    _compare(impl, dtype, "forward_kl", temperature=1.5, weight_hard_loss=0.5, weight_soft_loss=0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_label_term_alone_is_cross_entropy(impl):
    """weight_soft_loss=0: exactly torch's cross-entropy over the valid labels (the teacher is not read: NaN
    teacher logits change nothing)."""
    s, t, labels = _inputs(torch.float64 if impl != "triton" else torch.float32)
    t = torch.full_like(t, float("nan"))
    loss, grad = _run(distill_loss, s, t, impl=impl, labels=labels, weight_hard_loss=1.0, weight_soft_loss=0.0)
    ref = _run(lambda x: torch.nn.functional.cross_entropy(x.reshape(-1, V).double(), labels.reshape(-1)), s)
    _check((loss, grad), ref, _tol(s.dtype, impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_labels_of_their_own(impl):
    """hard_labels: the hard term on a subset (the teacher-written tokens), the soft term on all labels; both
    divided by the soft term's token count. Positions ignored in labels are ignored in hard_labels too."""
    s, t, labels = _inputs(torch.float64 if impl != "triton" else torch.float32)
    hard = torch.where(torch.rand(B, L) < 0.5, labels, torch.full_like(labels, -100))
    hard[0, 6] = 3  # ignored in labels: must stay ignored
    ours = _compare(impl, s.dtype, "reverse_kl", hard_labels=hard, weight_hard_loss=0.5)
    assert ours[1][0, 6].abs().max() == 0


# ----------------------------------------------------------------------------------------------------------
# reductions


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "sequence_mean"])
def test_reductions_with_hard_term(impl, reduction):
    _compare(impl, torch.float64 if impl != "triton" else torch.float32, "jsd", reduction=reduction,
             weight_hard_loss=0.25)


def test_sequence_mean_weighs_long_answers_more():
    """sequence_mean: each token's gradient is 1/B whatever its sequence's length (a long answer pulls
    harder); mean: 1/(valid tokens), the same for every token. Checked on the gradient of a sum of per-token
    losses: with every token's loss made identical, the gradient rows are equal up to that factor."""
    s, t, labels = _inputs()
    s = s[:1].expand(B, L, V).clone()
    t = t[:1].expand(B, L, V).clone()
    s[:, :, 4] = t[:, :, 4] = 0.0
    one = s[0, 0].expand(B, L, V).clone()
    t1 = t[0, 0].expand(B, L, V).clone()
    labels = torch.zeros(B, L, dtype=torch.long)
    labels[0, 2:] = -100  # sequence 0 has 2 tokens, the others 7
    _, g_seq = _run(distill_loss, one, t1, labels=labels, reduction="sequence_mean")
    _, g_tok = _run(distill_loss, one, t1, labels=labels, reduction="mean")
    _, g_sum = _run(distill_loss, one, t1, labels=labels, reduction="sum")
    valid = labels != -100
    torch.testing.assert_close(g_seq[valid], g_sum[valid] / B)
    torch.testing.assert_close(g_tok[valid], g_sum[valid] / valid.sum())


@pytest.mark.compare
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_sequence_mean_is_trl_batchmean(beta):
    """TRL's generalized_jsd_loss(reduction="batchmean"): without labels the sum over (B, L) / B, our
    sequence_mean; with labels the sum / valid tokens, our mean."""
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl (the `compare` extra) not installed")
    s, t, labels = _inputs()
    s[..., 4] = t[..., 4] = 0.0
    expected = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=1.5)
    ours = distill_loss(s, t, "jsd", beta=beta, temperature=1.5, reduction="sequence_mean")
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    trl_labels = labels.clone()
    expected = gkd.GKDTrainer.generalized_jsd_loss(s, t, labels=trl_labels, beta=beta, temperature=1.5)
    ours = distill_loss(s, t, "jsd", beta=beta, temperature=1.5, labels=labels, reduction="mean")
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# the sampled-token form


def _teacher_sampled():
    mask = torch.rand(B, L) < 0.5
    mask[1, :3] = True
    return mask


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "none", "sequence_mean"])
def test_sampled_matches_reference(impl, discount, reduction):
    ts = _teacher_sampled()
    _compare(impl, torch.float64 if impl != "triton" else torch.float32, "sampled_reverse_kl", discount=discount,
             reduction=reduction, teacher_sampled=ts, temperature=1.3, weight_soft_loss=0.8)


def test_sampled_importance_weights_clip():
    """The test inputs hold teacher-written tokens whose ratio p_S / p_T exceeds the cap, and some below it:
    the weights differ from both 1 and the raw ratio."""
    s, t, labels = _inputs()
    y = labels.clamp_min(0)[..., None]
    ratio = (s.log_softmax(-1).gather(-1, y) - t.log_softmax(-1).gather(-1, y)).exp()[..., 0]
    ts = _teacher_sampled() & (labels != -100)
    assert (ratio[ts] > 2.0).any() and (ratio[ts] < 1.0).any()
    a = distill_loss(s, t, "sampled_reverse_kl", labels=labels, teacher_sampled=ts, importance_cap=2.0)
    b = distill_loss(s, t, "sampled_reverse_kl", labels=labels, teacher_sampled=ts, importance_cap=1e9)
    c = distill_loss(s, t, "sampled_reverse_kl", labels=labels)
    assert len({round(float(x), 9) for x in (a, b, c)}) == 3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("own_targets", [False, True])
def test_sampled_with_hard_term(impl, temperature, own_targets):
    """The hard term shares the sampled form's gradient pass when its targets are the sampled tokens at
    T = 1, and runs as a pass of its own otherwise: both against the reference."""
    s, t, labels = _inputs()
    hard = torch.where(torch.rand(B, L) < 0.5, labels, torch.full_like(labels, -100)) if own_targets else None
    _compare(impl, torch.float64 if impl != "triton" else torch.float32, "sampled_reverse_kl", discount=0.9,
             temperature=temperature, weight_hard_loss=0.4, hard_labels=hard)


@pytest.mark.parametrize("impl", IMPLS)
def test_sampled_token_loss_takes_teacher_logprobs(impl):
    """sampled_token_loss from the teacher's log-probs of the sampled tokens == distill_loss from its logits."""
    s, t, labels = _inputs(torch.float64 if impl != "triton" else torch.float32)
    y = labels.clamp_min(0)[..., None]
    lp_t = (t.double() / 1.5).log_softmax(-1).gather(-1, y)[..., 0].to(s.dtype)
    ts = _teacher_sampled()
    kw = dict(labels=labels, temperature=1.5, discount=0.7, teacher_sampled=ts, impl=impl)
    a = _run(distill_loss, s, t, "sampled_reverse_kl", **kw)
    b = _run(lambda x: sampled_token_loss(x, labels, lp_t, **{k: v for k, v in kw.items() if k != "labels"}), s)
    _check(b, a, _tol(s.dtype, impl))


def test_sampled_gradient_is_reverse_kl_in_expectation():
    """With y ~ p_S (many draws of one row), the mean sampled-form gradient is the reverse KL's gradient
    (score-function identity); with y ~ p_T and uncapped importance weights p_S / p_T, too. The property is
    statistical: 400,000 draws, tolerance 5 standard errors per entry."""
    torch.manual_seed(0)
    v, n = 8, 400_000
    s = torch.randn(v, dtype=torch.float64)
    t = torch.randn(v, dtype=torch.float64)
    x = s[None].clone().requires_grad_()
    distill_loss(x, t[None], "reverse_kl").backward()
    exact = x.grad[0]
    for source, ts, cap in (("student", None, 2.0), ("teacher", True, 1e12)):
        probs = (s if source == "student" else t).softmax(-1)
        y = torch.multinomial(probs, n, replacement=True)
        xs = s.expand(n, v).clone().requires_grad_()
        teacher_sampled = None if ts is None else torch.ones(n, dtype=torch.bool)
        loss = distill_loss(xs, t.expand(n, v), "sampled_reverse_kl", labels=y, teacher_sampled=teacher_sampled,
                            importance_cap=cap, reduction="sum")
        loss.backward()
        per_draw = xs.grad
        mean, se = per_draw.mean(0), per_draw.std(0) / n**0.5
        assert ((mean - exact).abs() <= 5 * se + 1e-12).all(), (source, mean, exact, se)


# ----------------------------------------------------------------------------------------------------------
# the fused-linear loss


def _hidden(dtype=torch.float64, h=12):
    hs = torch.randn(B, L, h, dtype=dtype)
    ht = torch.randn(B, L, h + 3, dtype=dtype)
    ws = torch.randn(V, h, dtype=dtype) * 0.5
    wt = torch.randn(V, h + 3, dtype=dtype) * 0.5
    return hs, ws, ht, wt


def _fused_vs_dense(impl, kind, **kw):
    dtype = torch.float64 if impl != "triton" else torch.float32
    hs, ws, ht, wt = _hidden(dtype)
    _, _, labels = _inputs()
    kw.setdefault("labels", labels)
    a_h, a_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    fused = fused_linear_distill_loss(a_h, a_w, ht, wt, kind, chunk_size=5, impl=impl, **kw)
    fused.sum().backward()
    b_h, b_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    dense = reference_distill_loss(b_h.double() @ b_w.double().t(), ht.double() @ wt.double().t(), kind, **kw)
    dense.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fused.double(), dense, rtol=tol, atol=tol)
    for a, b in ((a_h, b_h), (a_w, b_w)):
        torch.testing.assert_close(a.grad.double(), b.grad.double(), rtol=tol, atol=tol * b.grad.abs().max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none", "sequence_mean"])
def test_fused_hard_term_and_reductions(impl, reduction):
    _fused_vs_dense(impl, "jsd", weight_hard_loss=0.5, weight_soft_loss=0.5, temperature=2.0, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("discount", [0.0, 0.8])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_sampled(impl, discount, reduction):
    """With a discount the fused form sweeps the chunks twice (chunk_size 5 splits sequences of 7)."""
    _fused_vs_dense(impl, "sampled_reverse_kl", discount=discount, teacher_sampled=_teacher_sampled(),
                    weight_hard_loss=0.3, reduction=reduction)


@pytest.mark.compare
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8)])
def test_liger_fused_linear_jsd_hard_term(beta, temperature, weights):
    """Liger's LigerFusedLinearJSDFunction(weight_hard_loss, weight_soft_loss): hard term = cross-entropy of
    the raw student logits, soft term = JSD at the temperature, both over the valid tokens."""
    jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss", reason="liger-kernel (the `compare` extra)")
    torch.manual_seed(1)
    n, h, v = 20, 16, 50
    hs = torch.randn(n, h, dtype=torch.float64)
    ht = torch.randn(n, h + 4, dtype=torch.float64)
    ws = torch.randn(v, h, dtype=torch.float64)
    wt = torch.randn(v, h + 4, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100
    hard, soft = weights
    a_h, a_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    expected = jsd.LigerFusedLinearJSDFunction.apply(a_h, a_w, ht, wt, labels, None, None, hard, soft, beta, -100,
                                                     temperature, False, 8)
    expected.backward()
    b_h, b_w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    ours = fused_linear_distill_loss(b_h, b_w, ht, wt, "jsd", beta=beta, temperature=temperature, labels=labels,
                                     weight_hard_loss=hard, weight_soft_loss=soft)
    ours.backward()
    # Liger accumulates its loss in float32 (its gradients in the inputs' float64)
    torch.testing.assert_close(ours, expected.double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b_h.grad, a_h.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b_w.grad, a_w.grad, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------
# the module and bad input


def test_module_carries_the_forms():
    s, t, labels = _inputs()
    loss = DistillLoss("sampled_reverse_kl", discount=0.5, weight_hard_loss=0.1, reduction="sequence_mean")
    torch.testing.assert_close(
        loss(s, t, labels),
        distill_loss(s, t, "sampled_reverse_kl", labels=labels, discount=0.5, weight_hard_loss=0.1,
                     reduction="sequence_mean"),
    )
    assert "weight_hard_loss=0.1" in repr(loss)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight_hard_loss=-1.0), "weight_hard_loss must be a finite number >= 0"),
        (dict(weight_hard_loss=0.0, weight_soft_loss=0.0), "both 0"),
        (dict(weight_hard_loss=float("nan")), "weight_hard_loss must be a finite number >= 0"),
        (dict(weight_hard_loss=0.5, labels=None), "weight_hard_loss > 0 needs labels"),
        (dict(hard_labels="L"), "set weight_hard_loss > 0"),
        (dict(kind="sampled_reverse_kl", labels=None), "needs labels: the sampled token"),
        (dict(discount=0.5), "apply to kind='sampled_reverse_kl'"),
        (dict(kind="sampled_reverse_kl", discount=1.5), "discount must be a number in [0, 1]"),
        (dict(kind="sampled_reverse_kl", importance_cap=0.0), "importance_cap must be a finite number > 0"),
        (dict(kind="sampled_reverse_kl", teacher_sampled="float"), "teacher_sampled must be a bool tensor"),
        (dict(kind="sampled_reverse_kl", teacher_sampled="short"), "teacher_sampled must have the leading shape"),
        (dict(reduction="batchmean"), "reduction must be one of"),
        (dict(kind="sampled", labels="L"), "kind must be one of"),
        (dict(kind="sampled_reverse_kl", labels="big"), "labels must be token ids in [0, 37)"),
        (dict(weight_hard_loss=0.5, hard_labels="big"), "hard_labels must be token ids in [0, 37)"),
    ],
)
def test_bad_input_one_line(kwargs, message):
    s, t, labels = _inputs()
    big = labels.clone()
    big[1, 1] = 99
    swap = {"L": labels, "big": big, "float": torch.rand(B, L),
            "short": torch.ones(B, dtype=torch.bool)}
    kw = {"labels": labels}
    kw.update({k: swap.get(v, v) if isinstance(v, str) and k != "kind" and k != "reduction" else v
               for k, v in kwargs.items()})
    kind = kw.pop("kind", "forward_kl")
    with pytest.raises((ValueError, TypeError)) as err:
        distill_loss(s, t, kind, **kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sequence_mean_and_discount_need_sequences():
    s, t, labels = _inputs()
    with pytest.raises(ValueError, match="sequence_mean' needs inputs of shape"):
        distill_loss(s[0], t[0], labels=labels[0], reduction="sequence_mean")
    with pytest.raises(ValueError, match="discount > 0 sums over later tokens"):
        distill_loss(s[0], t[0], "sampled_reverse_kl", labels=labels[0], discount=0.5)


@pytest.mark.parametrize("impl", IMPLS)
def test_fused_none_backward_from_an_expanded_grad_output(impl):
    """`.sum().backward()` hands reduction="none" an expanded (stride-0) grad_output, used as the per-row scale
    of the recomputed chunks: the Triton path once read it past its one element (gradients of 1e21)."""
    hs, ws, ht, wt = _hidden(torch.float32)
    grads = []
    for which in ("torch", impl):
        h = hs.clone().requires_grad_()
        fused_linear_distill_loss(h, ws, ht, wt, "jsd", reduction="none", chunk_size=5, impl=which).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
