"""Every loss op inside `torch.autocast` (bf16 and fp16) gives the fp32 result: same values and gradients
as outside autocast, with and without grad, on every implementation. Autocast would otherwise run the
fused loss's logits matmul in bf16/fp16 (rounded logits, or a dtype error against an fp32 weight).
"""

import pytest
import torch

from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch.ops import (
    DistillLoss,
    FusedLinearDistillLoss,
    distill_loss,
    fused_linear_distill_loss,
    sparse_distill_loss,
    token_divergence,
    topk_teacher_logprobs,
)
from adaswitch.ops.loss import reference_distill_loss

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
AMP_DTYPES = [torch.bfloat16, torch.float16]


def impls(device):
    dev = torch.device(device)
    return (
        ["torch"]
        + (["native"] if device == "cpu" and native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
        + (["triton"] if triton_available(dev) else [])
    )


CASES = [(d, i) for d in DEVICES for i in impls(d)]
TOL = dict(rtol=1e-5, atol=1e-6)


def _fused_problem(device, n=10, hs=16, ht=24, v=50):
    g = torch.Generator().manual_seed(2)
    mk = lambda *shape: (2 * torch.randn(*shape, generator=g)).to(device)  # noqa: E731
    return dict(hs=mk(n, hs), ws=mk(v, hs), bs=mk(v), ht=mk(n, ht), wt=mk(v, ht), bt=mk(v),
                labels=torch.tensor([0, 1, -100, 3, 4, 5, -100, 7, 8, 9], device=device))


def _run_fused(p, amp, grad, impl, reduction, **kw):
    leaves = [p[k].clone().requires_grad_(grad) for k in ("hs", "ws", "bs")]
    device = p["hs"].device.type
    with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None), torch.set_grad_enabled(grad):
        loss = fused_linear_distill_loss(
            leaves[0], leaves[1], p["ht"], p["wt"], "jsd", student_bias=leaves[2], teacher_bias=p["bt"],
            labels=p["labels"], reduction=reduction, chunk_size=3, impl=impl, beta=0.4, **kw,
        )
    assert loss.dtype == torch.float32
    if grad:
        loss.backward(torch.linspace(-1, 1, loss.numel(), device=loss.device).reshape(loss.shape))
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_under_autocast(device, impl, amp, grad, reduction):
    p = _fused_problem(device)
    kw = dict(student_logit_scale=0.5, teacher_softcap=3.0)
    loss, grads = _run_fused(p, amp, grad, impl, reduction, **kw)
    ref, ref_grads = _run_fused(p, None, grad, impl, reduction, **kw)
    torch.testing.assert_close(loss, ref, **TOL)
    for a, b in zip(grads, ref_grads):
        if not grad:
            assert a is None and b is None
            continue
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_fused_linear_logits_stay_fp32_without_grad(device, impl, amp):
    """No grad, autocast on: the loss is the fp32 loss, not the loss of bf16/fp16-rounded logits."""
    p = _fused_problem(device)
    hs, ht = p["hs"] / 4, p["ht"] / 5  # logits of a few units: rounding them shows in the loss
    with torch.no_grad(), torch.autocast(device, dtype=amp):
        loss = fused_linear_distill_loss(hs, p["ws"], ht, p["wt"], impl=impl)
    exact = reference_distill_loss((hs @ p["ws"].T).double(), (ht @ p["wt"].T).double())
    low = lambda h, w: (h.to(amp) @ w.to(amp).T).double()  # noqa: E731
    rounded = reference_distill_loss(low(hs, p["ws"]), low(ht, p["wt"]))
    err = abs(float(loss) - float(exact))
    assert err <= 1e-5 * abs(float(exact))
    assert abs(float(rounded) - float(exact)) > 10 * err  # the check would see rounded logits


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_fused_linear_low_precision_hidden_fp32_weight(device, impl, amp):
    """What a model under autocast hands over: bf16/fp16 hidden states, fp32 master weights. The loss is
    the fp32 loss of those (upcast) hidden states; the hidden-state gradient comes back in their dtype."""
    p = _fused_problem(device)
    hs = p["hs"].to(amp).requires_grad_()
    ws = p["ws"].clone().requires_grad_()
    with torch.autocast(device, dtype=amp):
        loss = fused_linear_distill_loss(hs, ws, p["ht"].to(amp), p["wt"], "forward_kl", impl=impl)
    loss.backward()
    hs32 = hs.detach().float().requires_grad_()
    ws32 = p["ws"].clone().requires_grad_()
    ref = fused_linear_distill_loss(hs32, ws32, p["ht"].to(amp).float(), p["wt"], "forward_kl", impl=impl)
    ref.backward()
    torch.testing.assert_close(loss, ref, **TOL)
    assert hs.grad.dtype == amp and ws.grad.dtype == torch.float32
    torch.testing.assert_close(hs.grad, hs32.grad.to(amp))
    torch.testing.assert_close(ws.grad, ws32.grad, **TOL)


def _logits_problem(device, n=12, v=40):
    g = torch.Generator().manual_seed(4)
    s = (3 * torch.randn(n, v, generator=g)).to(device)
    t = (3 * torch.randn(n, v, generator=g)).to(device)
    labels = torch.arange(n, device=device) % v
    labels[[2, 5]] = -100
    return s, t, labels


def _grad_and_value(fn, s, amp, grad=True):
    s = s.clone().requires_grad_(grad)
    device = s.device.type
    with torch.autocast(device, dtype=amp or torch.bfloat16, enabled=amp is not None), torch.set_grad_enabled(grad):
        out = fn(s)
    if grad:
        out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).reshape(out.shape))
    return out.detach(), s.grad


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_distill_loss_under_autocast(device, impl, amp, reduction):
    s, t, labels = _logits_problem(device)
    fns = [
        lambda x: distill_loss(x, t, "skew_reverse_kl", labels=labels, reduction=reduction, impl=impl),
        lambda x: DistillLoss("jsd", beta=0.3, reduction=reduction, impl=impl)(x, t, labels),
    ]
    for fn in fns:
        for grad in (True, False):
            out, g = _grad_and_value(fn, s, amp, grad)
            ref, ref_g = _grad_and_value(fn, s, None, grad)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, ref, **TOL)
            if grad:
                torch.testing.assert_close(g, ref_g, **TOL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_sparse_distill_loss_under_autocast(device, amp):
    s, t, labels = _logits_problem(device)
    top = topk_teacher_logprobs(t, 6, temperature=2.0)
    with torch.autocast(device, dtype=amp):
        top_amp = topk_teacher_logprobs(t, 6, temperature=2.0)
    for a, b in zip(top_amp, top):
        torch.testing.assert_close(a, b, **TOL)

    def fn(x):
        return sparse_distill_loss(x, top.logprobs, top.indices, "jsd", teacher_tail_logprobs=top.tail_logprobs,
                                   temperature=2.0, labels=labels)

    out, g = _grad_and_value(fn, s, amp)
    ref, ref_g = _grad_and_value(fn, s, None)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(g, ref_g, **TOL)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_token_divergence_under_autocast(device, impl, amp):
    s, t, _ = _logits_problem(device)
    with torch.autocast(device, dtype=amp):
        out = token_divergence(s, t, "tvd", impl=impl)
    torch.testing.assert_close(out, token_divergence(s, t, "tvd", impl=impl), **TOL)


@pytest.mark.parametrize("device,impl", CASES)
@pytest.mark.parametrize("amp", AMP_DTYPES)
def test_fused_module_under_autocast(device, impl, amp):
    p = _fused_problem(device)
    mod = FusedLinearDistillLoss("reverse_kl", chunk_size=4, impl=impl, student_softcap=2.0)

    def run(enabled):
        hs = p["hs"].clone().requires_grad_()
        with torch.autocast(device, dtype=amp, enabled=enabled):
            loss = mod(hs, p["ws"], p["ht"], p["wt"], p["labels"], p["bs"], p["bt"])
        loss.backward()
        return loss.detach(), hs.grad

    (loss, g), (ref, ref_g) = run(True), run(False)
    torch.testing.assert_close(loss, ref, **TOL)
    torch.testing.assert_close(g, ref_g, **TOL)


def test_distiller_step_with_mixed_precision(tmp_path):
    """bf16 mixed precision (accelerate autocasts the teacher's forward) and an autocast region around the
    step: both models keep the fused LM-head loss (the start-up check allows for bf16 matmuls), the step
    runs, and its loss is the fp32 logits loss up to the bf16 forward passes."""
    from test_loss_model_heads import family_model, first_batch, logits_loss, make_trainer

    trainer = make_trainer(tmp_path, family_model("gemma2", 1), family_model("granite", 2), bf16=True)
    assert trainer._fused_heads["student"] is not None and trainer._fused_heads["teacher"] is not None
    assert trainer._use_fused(trainer.model)
    batch = first_batch(trainer)
    expected = float(logits_loss(trainer, batch))
    trainer.model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = trainer.training_step(trainer.model, batch)
    assert float(loss) == pytest.approx(expected, rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in trainer.model.parameters() if p.grad is not None)
