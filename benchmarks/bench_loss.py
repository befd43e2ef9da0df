"""Distillation-loss benchmarks (Liger style): adaswitch against torch eager, torch.compile, TRL and
Liger, forward / backward / full pass, for the logits-input loss and the fused-linear loss.

    pytest benchmarks/bench_loss.py --benchmark-enable          # quick pytest-benchmark run, small shapes
    python benchmarks/loss_ratios.py                            # speed + peak memory CSV and ratio table

The providers below are shared by both scripts. Every provider computes the same loss (JSD, beta=0.5,
temperature 1, mean over non-ignored tokens) and is checked against adaswitch before timing.
Liger's logits-input JSD is a Triton kernel and cannot run natively on CPU (only under the
interpreter, which is not a speed measurement), so on CPU Liger appears in the fused-linear rows only
(its chunked loss is plain PyTorch).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from adaswitch.ops import distill_loss, fused_linear_distill_loss  # noqa: E402
from adaswitch.ops.loss import reference_distill_loss  # noqa: E402

KIND, BETA = "jsd", 0.5


# ----------------------------------------------------------------------------------------------------------
# inputs


def make_logits(n, v, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(n, v, generator=g, device=device).to(dtype)
    t = torch.randn(n, v, generator=g, device=device).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[: n // 8] = -100
    return {"s": s, "t": t, "labels": labels}


def make_hidden(n, h, v, dtype=torch.float32, device="cpu", seed=0, h_teacher=None):
    g = torch.Generator(device=device).manual_seed(seed)
    h_teacher = h_teacher or h

    def mk(*shape):  # logits of about unit scale
        return (torch.randn(*shape, generator=g, device=device) / shape[-1] ** 0.25).to(dtype)

    labels = torch.randint(0, v, (n,), generator=g, device=device)
    labels[: n // 8] = -100
    return {"hs": mk(n, h), "ws": mk(v, h), "ht": mk(n, h_teacher), "wt": mk(v, h_teacher), "labels": labels}


# ----------------------------------------------------------------------------------------------------------
# providers: each returns fn(inputs) -> loss, with the student leaves requiring grad


def _trl_loss():
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def logits_providers(device="cpu"):
    def ours(x):
        return distill_loss(x["s"], x["t"], KIND, beta=BETA, labels=x["labels"])

    def eager(x):
        return reference_distill_loss(x["s"], x["t"], KIND, beta=BETA, labels=x["labels"])

    compiled = torch.compile(eager, dynamic=False)
    out = {"adaswitch": ours, "torch": eager, "torch_compile": compiled}
    try:
        trl = _trl_loss()
        # TRL keeps the input dtype: on bf16 logits its loss is ~2% off, so it gets fp32 logits
        out["trl"] = lambda x: trl(x["s"].float(), x["t"].float(), labels=x["labels"], beta=BETA)
    except ImportError:
        pass
    if device == "cuda":
        try:
            from liger_kernel.transformers import LigerJSD

            liger = LigerJSD(beta=BETA)
            out["liger"] = lambda x: liger(
                x["s"].float().log_softmax(-1), x["t"].float().log_softmax(-1), x["labels"]
            )
        except ImportError:
            pass
    return out


def fused_providers(device="cpu"):
    def ours(x):
        return fused_linear_distill_loss(
            x["hs"], x["ws"], x["ht"], x["wt"], KIND, beta=BETA, labels=x["labels"]
        )

    def eager(x):
        zs = (x["hs"] @ x["ws"].T).float()
        zt = (x["ht"] @ x["wt"].T).float()
        return reference_distill_loss(zs, zt, KIND, beta=BETA, labels=x["labels"])

    compiled = torch.compile(eager, dynamic=False)
    out = {"adaswitch": ours, "torch": eager, "torch_compile": compiled}
    try:
        trl = _trl_loss()
        out["trl"] = lambda x: trl(
            (x["hs"] @ x["ws"].T).float(), (x["ht"] @ x["wt"].T).float(), labels=x["labels"], beta=BETA
        )
    except ImportError:
        pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, compiled=False)
        out["liger"] = lambda x: liger(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])
    except ImportError:
        pass
    return out


STUDENT_LEAVES = {"logits": ("s",), "fused": ("hs", "ws")}


def fresh_leaves(x, op):
    """Copy of the inputs with fresh student leaves (one backward per forward)."""
    y = dict(x)
    for k in STUDENT_LEAVES[op]:
        y[k] = x[k].detach().requires_grad_()
    return y


def run(fn, x, op, mode):
    """mode 'forward': the loss only; 'full': forward and backward."""
    y = fresh_leaves(x, op)
    loss = fn(y)
    if mode == "forward":
        return loss
    loss.backward()
    return loss


def check_same_loss(providers, x, op, rtol=1e-3):
    ref = run(providers["adaswitch"], x, op, "forward").detach().double()
    for name, fn in providers.items():
        got = run(fn, x, op, "forward").detach().double()
        if not torch.allclose(got, ref, rtol=rtol, atol=1e-6):
            raise AssertionError(f"{op}/{name}: loss {got.item()} != adaswitch {ref.item()}")


# ----------------------------------------------------------------------------------------------------------
# pytest-benchmark (small CPU shapes so the whole file runs in about a minute)

SMALL = {"logits": (256, 32000), "fused": (256, 512, 32000)}


@pytest.fixture(scope="module")
def logits_inputs():
    return make_logits(*SMALL["logits"])


@pytest.fixture(scope="module")
def fused_inputs():
    n, h, v = SMALL["fused"]
    return make_hidden(n, h, v)


@pytest.mark.parametrize("provider", ["adaswitch", "torch", "torch_compile", "trl"])
def test_bench_distill_loss_full(benchmark, logits_inputs, provider):
    providers = logits_providers()
    if provider not in providers:
        pytest.skip(f"{provider} is not installed")
    check_same_loss(
        {"adaswitch": providers["adaswitch"], provider: providers[provider]}, logits_inputs, "logits"
    )
    benchmark.pedantic(
        run, args=(providers[provider], logits_inputs, "logits", "full"), rounds=5, warmup_rounds=1
    )


@pytest.mark.parametrize("provider", ["adaswitch", "torch", "torch_compile", "trl", "liger"])
def test_bench_fused_linear_full(benchmark, fused_inputs, provider):
    providers = fused_providers()
    if provider not in providers:
        pytest.skip(f"{provider} is not installed")
    check_same_loss(
        {"adaswitch": providers["adaswitch"], provider: providers[provider]}, fused_inputs, "fused"
    )
    benchmark.pedantic(
        run, args=(providers[provider], fused_inputs, "fused", "full"), rounds=3, warmup_rounds=1
    )
