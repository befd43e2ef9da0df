"""Parity with the losses users switch from: TRL's generalized_jsd_loss and Liger's LigerJSD,
LigerKLDIVLoss and LigerFusedLinearJSDLoss (hard-loss weight 0). Skipped only when the package is
not installed; Liger's Triton kernels run under the Triton interpreter on CPU."""

import os

import pytest
import torch

from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch.ops import distill_loss, fused_linear_distill_loss

pytestmark = pytest.mark.compare
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
IMPLS = (
    ["torch"]
    + (["native"] if native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
    + (["triton"] if triton_available(torch.device("cpu")) else [])
)


def _grad(fn, x):
    x = x.clone().requires_grad_()
    loss = fn(x)
    loss.backward()
    return loss.detach().double(), x.grad.double()


def _trl_loss():
    trl_gkd = pytest.importorskip("trl.experimental.gkd", reason="trl is not installed")
    return trl_gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_trl_generalized_jsd(impl, temperature, beta):
    trl_loss = _trl_loss()
    s = torch.randn(2, 5, 37) * 2
    t = torch.randn(2, 5, 37) * 2
    labels = torch.randint(0, 37, (2, 5))
    labels[0, 3:] = -100
    for n_items in (None, 13):
        kw = dict(beta=beta, temperature=temperature, labels=labels, num_items_in_batch=n_items)
        theirs = _grad(lambda x, kw=kw: trl_loss(x.double(), t.double(), **kw), s)
        ours = _grad(lambda x, kw=kw: distill_loss(x, t, "jsd", impl=impl, **kw), s)
        torch.testing.assert_close(ours[0], theirs[0], rtol=2e-5, atol=1e-7)
        torch.testing.assert_close(ours[1], theirs[1], rtol=2e-4, atol=2e-7)


def _liger():
    return pytest.importorskip("liger_kernel.transformers", reason="liger-kernel is not installed")


def _run_liger(fn):
    """Runs a Liger Triton kernel (under the interpreter on CPU: see the `liger_on_interpreter` fixture)."""
    return fn()


@pytest.mark.parametrize("beta", BETAS)
def test_liger_jsd(beta):
    liger = _liger()
    if not triton_available(torch.device("cpu")):
        pytest.skip("Liger's Triton kernels need TRITON_INTERPRET=1 on CPU")
    s = torch.randn(9, 41) * 2
    t = torch.randn(9, 41) * 2
    labels = torch.randint(0, 41, (9,))
    labels[[1, 4]] = -100
    jsd = liger.LigerJSD(beta=beta)
    theirs = _run_liger(lambda: _grad(lambda x: jsd(x.log_softmax(-1), t.log_softmax(-1), labels), s))
    ours = _grad(lambda x: distill_loss(x, t, "jsd", beta=beta, labels=labels), s)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("liger_on_interpreter")
def test_liger_kl_div():
    liger = _liger()
    if not triton_available(torch.device("cpu")):
        pytest.skip("Liger's Triton kernels need TRITON_INTERPRET=1 on CPU")
    s = torch.randn(9, 41) * 2
    t = torch.randn(9, 41) * 2
    kl = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)
    theirs = _run_liger(lambda: _grad(lambda x: kl(x.log_softmax(-1), t.log_softmax(-1)), s))
    ours = _grad(lambda x: distill_loss(x, t, "forward_kl"), s)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_liger_fused_linear_jsd(temperature, beta):
    chunked = pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")
    n, hs_dim, ht_dim, v = 12, 8, 6, 33
    hs, ws = torch.randn(n, hs_dim), torch.randn(v, hs_dim)
    ht, wt = torch.randn(n, ht_dim), torch.randn(v, ht_dim)
    bs = torch.randn(v)
    labels = torch.randint(0, v, (n,))
    labels[[0, 5]] = -100
    loss_fn = chunked.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        beta=beta,
        temperature=temperature,
        compiled=False,
        chunk_size=5,
    )
    results = []
    for fn in (
        lambda h, w, b: loss_fn(h, w, ht, wt, labels, b),
        lambda h, w, b: fused_linear_distill_loss(
            h,
            w,
            ht,
            wt,
            "jsd",
            student_bias=b,
            beta=beta,
            temperature=temperature,
            labels=labels,
            chunk_size=5,
        ),
    ):
        leaves = [x.clone().requires_grad_() for x in (hs, ws, bs)]
        loss = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (theirs, g_theirs), (ours, g_ours) = results
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
