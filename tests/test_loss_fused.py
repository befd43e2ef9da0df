"""fused_linear_distill_loss equals distill_loss on the materialised logits (values and the gradients of
student hidden states, weight and bias), for every reduction, chunking and dtype; bad input.

Tolerances: float64 1e-10; float32 2e-5 relative to the largest gradient entry; bf16 inputs: loss 1e-5
relative against the float64 loss of the same bf16 values (the logits are never rounded to bf16),
gradients 1/64 relative (bf16 outputs of two matmuls).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch.ops import FusedLinearDistillLoss, fused_linear_distill_loss
from adaswitch.ops.loss import reference_distill_loss

IMPLS = (
    ["torch"]
    + (["native"] if native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
    + (["triton"] if triton_available(torch.device("cpu")) else [])
)


def _problem(dtype, n=13, hs=8, ht=12, v=29, bias=True):
    g = torch.Generator().manual_seed(1)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return dict(
        hs=mk(n, hs),
        ws=mk(v, hs),
        bs=mk(v) if bias else None,
        ht=mk(n, ht),
        wt=mk(v, ht),
        bt=mk(v) if bias else None,
    )


def _expected(p, kind, go, **kw):
    leaves = [p[k].double().requires_grad_() if p[k] is not None else None for k in ("hs", "ws", "bs")]
    hs, ws, bs = leaves
    zs = hs @ ws.T + (bs if bs is not None else 0)
    zt = p["ht"].double() @ p["wt"].double().T + (p["bt"].double() if p["bt"] is not None else 0)
    loss = reference_distill_loss(zs, zt, kind, **kw)
    loss.backward(go.double())
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def _ours(p, kind, go, **kw):
    leaves = [p[k].clone().requires_grad_() if p[k] is not None else None for k in ("hs", "ws", "bs")]
    loss = fused_linear_distill_loss(
        leaves[0], leaves[1], p["ht"], p["wt"], kind, student_bias=leaves[2], teacher_bias=p["bt"], **kw
    )
    loss.backward(go.to(loss.dtype))
    for x, ref in zip(leaves, ("hs", "ws", "bs")):
        if x is not None:
            assert x.grad.dtype == p[ref].dtype
    return loss.detach().double(), [x.grad.double() if x is not None else None for x in leaves]


def _check(ours, ref, tol_loss, tol_grad):
    assert torch.allclose(ours[0], ref[0], rtol=tol_loss, atol=tol_loss), (ours[0], ref[0])
    for a, b in zip(ours[1], ref[1]):
        if b is None:
            assert a is None
            continue
        assert (a - b).abs().max() <= tol_grad * b.abs().max().clamp_min(1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_fused_equals_unfused(impl, reduction, kind):
    p = _problem(torch.float32)
    labels = torch.randint(0, 29, (13,))
    labels[[2, 7]] = -100
    go = torch.randn(13) if reduction == "none" else torch.tensor(-0.8)
    kw = dict(labels=labels, reduction=reduction, temperature=2.0, beta=0.3, alpha=0.2)
    ours = _ours(p, kind, go, chunk_size=4, impl=impl, **kw)
    _check(ours, _expected(p, kind, go, **kw), 2e-5, 2e-5)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64, None])
def test_chunking_float64_no_bias(chunk_size):
    p = _problem(torch.float64, bias=False)
    go = torch.tensor(1.0)
    kw = dict(num_items_in_batch=20)
    ours = _ours(p, "reverse_kl", go, chunk_size=chunk_size, impl="torch", **kw)
    _check(ours, _expected(p, "reverse_kl", go, **kw), 1e-10, 1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_logits_stay_fp32(impl):
    """Logits must not be rounded to bf16 before the fp32 math (a known pitfall of chunked fused losses)."""
    p = _problem(torch.bfloat16, n=9, hs=16, ht=24, v=50)
    go = torch.tensor(1.0)
    ours = _ours(p, "jsd", go, impl=impl, chunk_size=4)
    ref = _expected(p, "jsd", go)
    _check(ours, ref, 1e-5, 1 / 64)
    s = (p["hs"] @ p["ws"].T + p["bs"]).double()  # what a bf16 matmul would give: visibly different loss
    t = (p["ht"] @ p["wt"].T + p["bt"]).double()
    rounded = reference_distill_loss(s, t, "jsd")
    assert abs(rounded - ref[0]) > 10 * abs(ours[0] - ref[0])


def test_leading_shape_module_and_teacher_constant():
    p = _problem(torch.float32, n=12)
    hs = p["hs"].reshape(3, 4, 8).requires_grad_()
    ht = p["ht"].reshape(3, 4, 12).requires_grad_()
    wt = p["wt"].clone().requires_grad_()
    labels = torch.randint(0, 29, (3, 4))
    mod = FusedLinearDistillLoss("tvd", reduction="none", chunk_size=5)
    loss = mod(hs, p["ws"], ht, wt, labels)
    assert loss.shape == (3, 4)
    loss.sum().backward()
    assert hs.grad.shape == (3, 4, 8) and ht.grad is None and wt.grad is None
    flat = fused_linear_distill_loss(
        p["hs"], p["ws"], p["ht"], p["wt"], "tvd", labels=labels.reshape(-1), reduction="none"
    )
    torch.testing.assert_close(loss.reshape(-1), flat)


def test_all_ignored_zero():
    p = _problem(torch.float32)
    hs = p["hs"].clone().requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    loss = fused_linear_distill_loss(hs, ws, p["ht"], p["wt"], labels=torch.full((13,), -100))
    loss.backward()
    assert loss.item() == 0 and not hs.grad.any() and not ws.grad.any()


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(ht=torch.randn(12, 12)), ValueError, "teacher_hidden must have"),
        (dict(ws=torch.randn(29, 9)), ValueError, "student_weight must be"),
        (dict(wt=torch.randn(29, 11)), ValueError, "teacher_weight must be"),
        (dict(wt=torch.randn(30, 12)), ValueError, "same vocabulary size"),
        (dict(bs=torch.randn(28)), ValueError, "student_bias must have shape"),
        (dict(ws=torch.randn(29)), ValueError, "student_weight must have 2"),
        (dict(hs=torch.zeros(13, 8, dtype=torch.long)), TypeError, "student_hidden"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(labels=torch.zeros(12, dtype=torch.long)), ValueError, "labels must have"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(num_items_in_batch=0), ValueError, "num_items_in_batch"),
    ],
)
def test_bad_input(change, err, match):
    p = _problem(torch.float32)
    args = dict(hs=p["hs"], ws=p["ws"], ht=p["ht"], wt=p["wt"], bs=None)
    extra = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    with pytest.raises(err, match=match):
        fused_linear_distill_loss(
            args["hs"], args["ws"], args["ht"], args["wt"], student_bias=args["bs"], **extra
        )


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in {"_local_scalar_dense", "item", "is_nonzero", "equal"}:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_sync(reduction):
    p = _problem(torch.float32)
    hs = p["hs"].clone().requires_grad_()
    labels = torch.randint(0, 29, (13,))
    with _SyncCounter() as counter:
        loss = fused_linear_distill_loss(
            hs, p["ws"], p["ht"], p["wt"], "jsd", labels=labels, reduction=reduction, chunk_size=4
        )
        loss.backward(torch.ones_like(loss))
    assert counter.count == 0
