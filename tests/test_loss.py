"""distill_loss: values and gradients against the float64 reference (autograd), gradcheck of the
reference, reductions, ignore_index, no host sync, bad input.

Tolerances: float64 inputs on the PyTorch path 1e-10; float32 accumulation (Triton, or float32 inputs)
1e-5 relative to the largest gradient entry; bf16 inputs: loss 1e-5 relative (accumulated in fp32 from
the same bf16 values), gradient 1/128 relative (one bf16 rounding of the output).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch._validation import KINDS
from adaswitch.ops import DistillLoss, distill_loss
from adaswitch.ops.loss import reference_distill_loss

IMPLS = (
    ["torch"]
    + (["native"] if native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
    + (["triton"] if triton_available(torch.device("cpu")) else [])
)
# (kind, beta, alpha): every kind, JSD betas across [0, 1] (incl. the endpoints), three skew alphas
CASES = (
    [(k, 0.5, 0.1) for k in ("forward_kl", "reverse_kl", "tvd")]
    + [("jsd", b, 0.1) for b in (0.0, 0.1, 0.5, 0.9, 1.0)]
    + [(k, 0.5, a) for k in ("skew_forward_kl", "skew_reverse_kl") for a in (0.0, 0.1, 0.9)]
)


def _logits(n, v, dtype=torch.float64, scale=3.0):
    s = torch.randn(n, v, dtype=torch.float64) * scale
    t = torch.randn(n, v, dtype=torch.float64) * scale
    s[0, 4] = t[0, 4] = float("-inf")  # a masked vocabulary entry (both sides, so every kind is finite)
    s[n - 1, 0] = t[n - 1, 0] = float("-inf")
    return s.to(dtype), t.to(dtype)


def _ref(s, t, kind, grad_out, **kw):
    x = s.detach().double().requires_grad_()
    loss = reference_distill_loss(x, t.double(), kind, **kw)
    if loss.requires_grad:
        (loss * grad_out.double()).sum().backward()
    return loss.detach(), (x.grad if x.grad is not None else torch.zeros_like(x))


def _ours(s, t, kind, grad_out, **kw):
    x = s.detach().clone().requires_grad_()
    loss = distill_loss(x, t, kind, **kw)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss.detach().double(), x.grad.double()


def _close(ours, ref, tol):
    (lo, go), (lr, gr) = ours, ref
    assert torch.allclose(lo, lr, rtol=tol, atol=tol * max(1.0, lr.abs().max().item())), (lo, lr)
    err = (go - gr).abs().max().item()
    assert err <= tol * max(1e-3, gr.abs().max().item()), err


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta,alpha", CASES)
def test_values_and_gradients(impl, temperature, kind, beta, alpha):
    s, t = _logits(7, 37)
    labels = torch.tensor([3, -100, 5, 1, -100, 0, 2])
    kw = dict(beta=beta, alpha=alpha, temperature=temperature, labels=labels)
    go = torch.tensor(-1.7, dtype=torch.float64)
    tol = 1e-10 if impl != "triton" else 2e-5
    _close(_ours(s, t, kind, go, impl=impl, **kw), _ref(s, t, kind, go, **kw), tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "kind,beta,alpha",
    [("jsd", 0.1, 0.1), ("tvd", 0.5, 0.1), ("skew_forward_kl", 0.5, 0.3), ("skew_reverse_kl", 0.5, 0.3)],
)
def test_one_sided_neg_inf(impl, kind, beta, alpha):
    """-inf on one side only: these kinds stay finite, with zero gradient at the student's -inf entries."""
    s, t = _logits(5, 29)
    s[1, 3] = float("-inf")
    t[2, 7] = float("-inf")
    kw = dict(beta=beta, alpha=alpha, temperature=1.0)
    go = torch.tensor(1.0, dtype=torch.float64)
    ours = _ours(s, t, kind, go, impl=impl, **kw)
    assert torch.isfinite(ours[0]).all() and torch.isfinite(ours[1]).all() and ours[1][1, 3] == 0
    _close(ours, _ref(s, t, kind, go, **kw), 1e-10 if impl != "triton" else 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reductions_dtypes_odd_shape(impl, reduction, dtype):
    s, t = _logits(3 * 5, 301, dtype=dtype)
    s, t = s.reshape(3, 5, 301), t.reshape(3, 5, 301)
    labels = torch.randint(0, 301, (3, 5))
    labels[0, :2] = -100
    go = (
        torch.randn(3, 5, dtype=torch.float64)
        if reduction == "none"
        else torch.tensor(0.37, dtype=torch.float64)
    )
    kw = dict(labels=labels, reduction=reduction, temperature=2.0, beta=0.3)
    ours = _ours(s, t, "jsd", go, impl=impl, **kw)
    ref = _ref(s, t, "jsd", go, **kw)
    lo, go_ = ours
    assert lo.shape == ((3, 5) if reduction == "none" else ())
    assert go_.shape == s.shape
    if dtype == torch.float32:
        _close(ours, ref, 2e-5)
    else:
        _close((lo, go_), ref, 1 / 128)
        assert torch.allclose(lo, ref[0], rtol=1e-5, atol=1e-7)  # no bf16 rounding before the fp32 cast


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl):
    """bf16 student against an fp32 teacher (a teacher kept in full precision)."""
    s, t = _logits(5, 50)
    go = torch.tensor(1.0, dtype=torch.float64)
    ours = _ours(s.bfloat16(), t.float(), "jsd", go, impl=impl)
    ref = _ref(s.bfloat16(), t.float(), "jsd", go)
    _close(ours, ref, 1 / 128)


@pytest.mark.parametrize("impl", IMPLS)
def test_num_items_in_batch_and_no_labels(impl):
    s, t = _logits(6, 40, dtype=torch.float32)
    labels = torch.tensor([1, 2, -100, 3, 4, -100])
    go = torch.tensor(1.0, dtype=torch.float64)
    for n_items in (11, torch.tensor(11.0)):
        ours = _ours(s, t, "forward_kl", go, impl=impl, labels=labels, num_items_in_batch=n_items)
        ref = _ref(s, t, "forward_kl", go, labels=labels, reduction="sum")
        _close(ours, (ref[0] / 11, ref[1] / 11), 2e-5)
    _close(_ours(s, t, "tvd", go, impl=impl), _ref(s, t, "tvd", go), 2e-5)  # mean over all 6 rows


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_not_nan(impl, reduction):
    s, t = _logits(4, 33, dtype=torch.float32)
    s[2] = float("-inf")  # a padding row holding garbage must not leak NaN
    x = s.clone().requires_grad_()
    loss = distill_loss(x, t, "jsd", labels=torch.full((4,), -100), reduction=reduction, impl=impl)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck_reference_float64():
    """The executable spec is differentiable; our analytic formulas are compared with its autograd above."""
    s, t = _logits(3, 9)
    labels = torch.tensor([1, -100, 2])
    for kind, beta, alpha in CASES:
        for temperature in (1.0, 2.0):

            def f(x, kind=kind, beta=beta, alpha=alpha, temperature=temperature):
                return reference_distill_loss(
                    x, t, kind, beta=beta, alpha=alpha, temperature=temperature, labels=labels
                )

            x = s.clone().requires_grad_()
            if kind == "tvd":  # |.| is not smooth where p_S = p_T; random logits keep away from it
                assert torch.autograd.gradcheck(f, (x,), eps=1e-7, atol=1e-6, fast_mode=True)
            else:
                assert torch.autograd.gradcheck(f, (x,), fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_directional_derivative_float64(kind):
    """Our analytic gradient against central differences of our own loss (float64, PyTorch path);
    gradcheck itself needs two backwards per graph, which the in-place backward refuses."""
    s, t = _logits(3, 9)
    u = torch.randn_like(s).masked_fill(torch.isinf(s), 0.0)
    x = s.clone().requires_grad_()
    distill_loss(x, t, kind, temperature=2.0, beta=0.3, alpha=0.2).backward()
    eps = 1e-6
    f = [distill_loss(s + d * eps * u, t, kind, temperature=2.0, beta=0.3, alpha=0.2) for d in (1, -1)]
    fd = (f[0] - f[1]) / (2 * eps)
    assert abs(fd - (x.grad * u).sum()) <= 1e-7 * max(1.0, abs(fd.item()))


class _SyncCounter(TorchDispatchMode):
    SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", IMPLS)
def test_no_host_sync(impl):
    s, t = _logits(5, 40, dtype=torch.float32)
    labels = torch.tensor([1, -100, 2, 3, 4])
    x = s.clone().requires_grad_()
    with _SyncCounter() as counter:
        for reduction in ("mean", "sum", "none"):
            loss = distill_loss(
                x,
                t,
                "jsd",
                labels=labels,
                reduction=reduction,
                impl=impl,
                num_items_in_batch=torch.tensor(4.0) if reduction == "mean" else None,
            )
            loss.backward(torch.ones_like(loss))
    # one read: the CPU tensor num_items_in_batch is checked to be > 0 (reading a CPU value waits for no
    # device; a num_items_in_batch on the logits' accelerator is not read). Nothing else reads.
    assert counter.count == 1
    with _SyncCounter() as counter:
        loss = distill_loss(x, t, "jsd", labels=labels, impl=impl)
        loss.backward()
    assert counter.count == 0
    with _SyncCounter() as control:  # the counter does see a sync
        bool(x.sum() > 0)
    assert control.count == 1


def test_backward_twice_raises_and_module():
    s, t = _logits(3, 10, dtype=torch.float32)
    x = s.clone().requires_grad_()
    loss = DistillLoss("reverse_kl", temperature=2.0)(x, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()
    expected = distill_loss(s, t, "reverse_kl", temperature=2.0)
    assert torch.equal(loss.detach(), expected)
    assert "reverse_kl" in repr(DistillLoss("reverse_kl"))


def test_no_grad_when_student_is_constant():
    s, t = _logits(3, 10, dtype=torch.float32)
    loss = distill_loss(s, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference_distill_loss(s, t))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(teacher_logits=torch.randn(4, 11)), ValueError, "vocabulary size"),
        (dict(teacher_logits=torch.randn(5, 10)), ValueError, "same shape"),
        (dict(student_logits=torch.zeros(4, 10, dtype=torch.long)), TypeError, "student_logits"),
        (dict(labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels must have"),
        (dict(labels=torch.zeros(4)), TypeError, "labels must be an integer"),
        (dict(labels=[0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=-3.0), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch"),
        (dict(num_items_in_batch=torch.tensor(0.0)), ValueError, r"num_items_in_batch must be > 0, got tensor"),
        (dict(num_items_in_batch=torch.tensor(-2)), ValueError, r"num_items_in_batch must be > 0, got tensor"),
        (dict(num_items_in_batch=torch.tensor(True)), TypeError, "num_items_in_batch must be a real"),
        (dict(num_items_in_batch=4, reduction="sum"), ValueError, "num_items_in_batch"),
        (dict(kind="kl"), ValueError, "kind"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(impl="cuda"), ValueError, "impl"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(student_logits=torch.randn(4, 10), teacher_logits=torch.randn(4, 10))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        distill_loss(**args)


@pytest.mark.skipif(not native_available(), reason="the native op is not built")
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_native_runs_mixed_dtype_pairs(monkeypatch, dtypes):
    """impl="native" with a student and a teacher of different dtypes runs the native op (no silent fallback
    to PyTorch) and matches the PyTorch implementation; the gradient keeps the student's dtype."""
    import adaswitch.ops.rows as loss_module  # where the loss ops call the native op

    calls, real = [], loss_module.native_ops()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    s = torch.randn(6, 50).to(dtypes[0]).requires_grad_()
    t = torch.randn(6, 50).to(dtypes[1])
    ref = distill_loss(s, t, "jsd", impl="torch")
    (g_ref,) = torch.autograd.grad(ref, s)
    monkeypatch.setattr(loss_module, "native_ops", lambda: Spy())
    out = distill_loss(s, t, "jsd", impl="native")
    (g,) = torch.autograd.grad(out, s)
    assert calls == ["distill_loss_rows"]
    assert g.dtype == dtypes[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.float(), g_ref.float(), rtol=1e-2, atol=1e-3)
