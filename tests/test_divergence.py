"""token_divergence: every implementation (Triton under the interpreter, native CPU op, PyTorch)
against the float64 reference on fresh random inputs, plus argument errors, bad-row behaviour and
parity with TRL's and Liger-Kernel's conventions.

Tolerances: every implementation upcasts the (possibly bf16/fp16) inputs to float32 before any
arithmetic, so it is compared with the float64 reference evaluated on the *same* rounded inputs and
the only error is float32 accumulation. That error is relative for the sums and absolute (a few
float32 ulps of the log-sum-exp, which grows with the logits' scale / temperature) for the
cancellation in KL = E[x - y] - lse_x + lse_y; TOLERANCES states both per input dtype.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from adaswitch import token_divergence
from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch._validation import KINDS
from adaswitch.reference import divergence_rows

# input dtype -> (rtol, atol per unit of logit scale). float64 runs in double on native / torch.
TOLERANCES = {
    torch.float32: (1e-4, 2e-6),
    torch.bfloat16: (1e-4, 2e-6),
    torch.float16: (1e-4, 2e-6),
    torch.float64: (3e-7, 1e-10),  # computed in double, rounded once to the float32 output
}


def _impls():
    no_native = not native_available()
    no_triton = not triton_available(torch.device("cpu"))
    return [
        "torch",
        pytest.param("native", marks=pytest.mark.skipif(no_native, reason="adaswitch._C not built")),
        pytest.param("triton", marks=pytest.mark.skipif(no_triton, reason="needs TRITON_INTERPRET=1")),
    ]


IMPLS = _impls()

# The Triton interpreter evaluates -inf - -inf and log2(0) in numpy on masked lanes (discarded by
# tl.where); numpy warns about them.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


def make_logits(rows: int, vocab: int, dtype=torch.float32, case: str = "normal"):
    """(student, teacher) of shape [rows, vocab]: 'normal', 'peaked' (x30), 'masked' (-inf entries,
    never a whole row), 'identical'."""
    s = torch.randn(rows, vocab, dtype=torch.float64) * 2.0
    t = s + torch.randn(rows, vocab, dtype=torch.float64)
    if case == "peaked":
        s, t = s * 30.0, t * 30.0
    elif case == "masked" and vocab > 1:
        keep = torch.zeros(rows, vocab, dtype=torch.bool)
        keep[torch.arange(rows), torch.randint(0, vocab, (rows,))] = True  # one shared finite entry per row
        mask_t = (torch.rand(rows, vocab) < 0.3) & ~keep
        mask_s = (torch.rand(rows, vocab) < 0.3) & ~keep
        mask_t[0] = mask_s[0] = False  # row 0: same mask on both sides
        shared = (torch.rand(vocab) < 0.5) & ~keep[0]
        mask_t[0], mask_s[0] = shared, shared
        t = t.masked_fill(mask_t, -math.inf)
        s = s.masked_fill(mask_s, -math.inf)
    elif case == "identical":
        t = s.clone()
    return s.to(dtype), t.to(dtype)


def reference(s, t, kind, *, beta=0.5, alpha=0.1, temperature=1.0):
    return divergence_rows(s.double(), t.double(), kind, beta=beta, alpha=alpha, temperature=temperature,
                           dtype=torch.float64)


def assert_matches(out, s, t, kind, *, beta=0.5, alpha=0.1, temperature=1.0, impl=None):
    ref = reference(s, t, kind, beta=beta, alpha=alpha, temperature=temperature)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # Triton accumulates float64 inputs in float32 too; native and torch in double.
    key = torch.float32 if (s.dtype == torch.float64 and impl == "triton") else s.dtype
    rtol, atol_unit = TOLERANCES[key]
    finite = torch.cat([s.double()[torch.isfinite(s)], t.double()[torch.isfinite(t)], torch.ones(1)])
    scale = finite.abs().max().item() / temperature
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol_unit * max(scale, 1.0), equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["normal", "peaked", "masked", "identical"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(impl, dtype, case, kind):
    s, t = make_logits(3, 1271, dtype, case)
    out = token_divergence(s, t, kind, impl=impl)
    assert_matches(out, s, t, kind)
    if case == "identical":
        assert out.abs().max().item() <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("vocab", [1, 7, 1271, 32000])
@pytest.mark.parametrize("kind", KINDS)
def test_vocab_sizes(impl, vocab, kind):
    s, t = make_logits(2, vocab, torch.float32, "masked" if vocab > 7 else "normal")
    assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_large_vocab_bf16(impl, kind):
    """Qwen-sized vocabulary (151936), two rows, bf16 logits of realistic scale."""
    s, t = make_logits(2, 151936, torch.bfloat16, "normal")
    assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_max_vocab(impl, kind):
    s, t = make_logits(1, 262144, torch.float32, "masked")
    assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_temperature(impl, temperature, beta):
    s, t = make_logits(4, 1000, torch.float32, "masked")
    out = token_divergence(s, t, "jsd", beta=beta, temperature=temperature, impl=impl)
    assert_matches(out, s, t, "jsd", beta=beta, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("kind", ["skew_forward_kl", "skew_reverse_kl"])
def test_skew_alpha(impl, temperature, alpha, kind):
    s, t = make_logits(4, 1000, torch.float32, "masked")
    out = token_divergence(s, t, kind, alpha=alpha, temperature=temperature, impl=impl)
    assert_matches(out, s, t, kind, alpha=alpha, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "tvd"])
def test_temperature(impl, temperature, kind):
    s, t = make_logits(4, 1000, torch.bfloat16, "peaked")
    assert_matches(token_divergence(s, t, kind, temperature=temperature, impl=impl), s, t, kind,
                   temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_endpoints_are_plain_kls(impl, kind):
    """TRL / Liger: jsd(beta=0) == forward KL, jsd(beta=1) == reverse KL; skew(alpha=0) == plain KL."""
    s, t = make_logits(3, 500, torch.float32, "masked")
    fwd = token_divergence(s, t, "forward_kl", impl=impl)
    rev = token_divergence(s, t, "reverse_kl", impl=impl)
    if kind == "jsd":
        torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0, impl=impl), fwd)
        torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0, impl=impl), rev)
    elif kind.startswith("skew"):
        plain = fwd if kind == "skew_forward_kl" else rev
        torch.testing.assert_close(token_divergence(s, t, kind, alpha=0.0, impl=impl), plain)
        assert token_divergence(s, t, kind, alpha=1.0, impl=impl).abs().max().item() <= 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_inputs(impl):
    s, t = make_logits(3, 777, torch.float64, "masked")
    for kind in KINDS:
        assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes(impl):
    """A bf16 student against an fp32 teacher (a common KD set-up) needs no cast by the caller."""
    s, t = make_logits(3, 999, torch.float32, "masked")
    s = s.to(torch.bfloat16)
    for kind in ("forward_kl", "jsd"):
        assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_shape(impl):
    s, t = make_logits(2 * 3, 301, torch.bfloat16, "normal")
    s3, t3 = s.view(2, 3, 301), t.view(2, 3, 301)
    out = token_divergence(s3, t3, "jsd", impl=impl)
    assert out.shape == (2, 3)
    assert_matches(out.reshape(-1), s, t, "jsd")
    assert token_divergence(s[0], t[0], impl=impl).shape == ()  # a single row: a 0-d result


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["forward_kl", "tvd", "skew_reverse_kl"])
def test_non_contiguous(impl, kind):
    s, t = make_logits(4, 2 * 513, torch.float32, "masked")
    s_cols, t_cols = s[:, ::2], t[:, 1::2]  # column stride 2
    assert_matches(token_divergence(s_cols, t_cols, kind, impl=impl), s_cols, t_cols, kind)
    s_t = s.t().contiguous().t()  # row stride 1, column stride = rows
    assert not s_t.is_contiguous()
    assert_matches(token_divergence(s_t, t, kind, impl=impl), s_t, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_bad_rows_give_nan(impl, kind):
    """Documented: a row that is all -inf or holds NaN gives NaN; the other rows are unaffected."""
    s, t = make_logits(5, 300, torch.float32, "normal")
    s[0] = -math.inf          # student row all -inf
    t[1] = -math.inf          # teacher row all -inf
    s[2, 17] = math.nan       # NaN in the student
    t[3, 299] = math.nan      # NaN in the teacher (last entry: the tail of a tile)
    out = token_divergence(s, t, kind, impl=impl)
    assert torch.isnan(out[:4]).all()
    assert_matches(out[4:], s[4:], t[4:], kind)


@pytest.mark.parametrize("impl", IMPLS)
def test_infinite_where_support_differs(impl):
    """KL(p_T || p_S) is +inf where the teacher has mass the student masked out; JSD / TVD stay finite."""
    s, t = make_logits(2, 64, torch.float32, "normal")
    s[:, 5] = -math.inf
    assert torch.isinf(token_divergence(s, t, "forward_kl", impl=impl)).all()
    assert torch.isfinite(token_divergence(s, t, "reverse_kl", impl=impl)).all()
    for kind in ("jsd", "tvd", "skew_forward_kl"):
        assert_matches(token_divergence(s, t, kind, impl=impl), s, t, kind)


@pytest.mark.parametrize("impl", IMPLS)
def test_infinite_even_where_teacher_mass_underflows(impl):
    """A finite teacher logit over a masked student entry makes KL(p_T || p_S) +inf even when that
    teacher probability underflows in float32 (exp(-100)), as the float64 reference says, and no
    0 * inf NaN appears while the running max moves."""
    s = torch.tensor([[5.0, -math.inf, 0.0, 100.0], [0.0, -math.inf, 1.0, 2.0]])
    t = torch.tensor([[100.0, -200.0, 0.0, 0.0], [-300.0, -200.0, 100.0, 400.0]])
    out = token_divergence(s, t, "forward_kl", impl=impl)
    assert torch.isinf(out).all() and (out > 0).all()
    assert_matches(token_divergence(s, t, "reverse_kl", impl=impl), s, t, "reverse_kl")


# ---------------------------------------------------------------------------------------------------
# Argument errors: each check of adaswitch/_validation.py, reached through token_divergence.

def _good():
    return torch.randn(2, 8), torch.randn(2, 8)


@pytest.mark.parametrize(
    "student, teacher, exc, match",
    [
        ([[0.0, 1.0]], torch.randn(1, 2), TypeError, "student_logits must be a torch.Tensor"),
        (torch.randn(1, 2), None, TypeError, "teacher_logits must be a torch.Tensor"),
        (torch.ones(2, 8, dtype=torch.int64), torch.randn(2, 8), TypeError, "student_logits must be float16"),
        (torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool), TypeError, "teacher_logits must be float16"),
        (torch.tensor(1.0), torch.tensor(1.0), ValueError, "at least one dimension"),
        (torch.randn(0, 8), torch.randn(0, 8), ValueError, "at least one row"),
        (torch.randn(2, 0), torch.randn(2, 0), ValueError, "non-empty vocabulary"),
        (torch.randn(2, 8), torch.randn(2, 9), ValueError, "same vocabulary size"),
        (torch.randn(2, 8), torch.randn(3, 8), ValueError, "same shape"),
        (torch.randn(2, 8), torch.randn(2, 8, device="meta"), ValueError, "same device"),
    ],
)
def test_bad_tensors(student, teacher, exc, match):
    with pytest.raises(exc, match=match):
        token_divergence(student, teacher)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "kl"}, "kind must be one of"),
        ({"kind": None}, "kind must be one of"),
        ({"beta": -0.1}, "beta must be a number in"),
        ({"beta": 1.5}, "beta must be a number in"),
        ({"beta": True}, "beta must be a number in"),
        ({"beta": "0.5"}, "beta must be a number in"),
        ({"alpha": 2.0}, "alpha must be a number in"),
        ({"alpha": math.nan}, "alpha must be a number in"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"temperature": math.inf}, "temperature must be a finite number > 0"),
        ({"impl": "cuda"}, "impl must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    s, t = _good()
    with pytest.raises(ValueError, match=match):
        token_divergence(s, t, **kwargs)


@pytest.mark.skipif(not native_available(), reason="adaswitch._C not built")
def test_native_op_checks_its_own_arguments():
    """torch.ops.adaswitch.token_divergence is public too: it must not read out of bounds on bad input."""
    op = native_ops().token_divergence
    s, t = _good()
    with pytest.raises(ValueError, match="2-D"):
        op(s[0], t[0], 0, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        op(s, t[:, :4], 0, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match="floating point"):
        op(s, t.int(), 0, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match="kind must be in"):
        op(s, t, 6, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match="temperature"):
        op(s, t, 0, 0.5, 0.1, 0.0)
    with pytest.raises(ValueError, match="beta"):
        op(s, t, 2, 1.5, 0.1, 1.0)


def test_triton_unavailable_is_a_clear_error(monkeypatch):
    import adaswitch._backend as backend

    monkeypatch.setattr(backend, "triton_available", lambda device: False)
    s, t = _good()
    with pytest.raises(ValueError, match="impl='triton' is not available"):
        token_divergence(s, t, impl="triton")


def test_no_grad_and_float32_output():
    s = torch.randn(3, 50, requires_grad=True)
    t = torch.randn(3, 50)
    out = token_divergence(s, t)
    assert out.dtype == torch.float32 and not out.requires_grad


# ---------------------------------------------------------------------------------------------------
# Parity with TRL's generalized_jsd_loss (the beta convention we match) and Liger-Kernel.

def trl_generalized_jsd_loss(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """TRL's GKDTrainer.generalized_jsd_loss (reduction="batchmean", no labels), re-derived: F.kl_div
    with swapped arguments, beta == 0 / 1 special-cased, mixture through logsumexp."""
    import torch.nn.functional as F

    logp_s = F.log_softmax(student_logits / temperature, dim=-1)
    logp_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(logp_s, logp_t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(logp_t, logp_s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=logp_s.dtype)
        logm = torch.logsumexp(torch.stack([logp_s + torch.log1p(-b), logp_t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(logm, logp_t, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            logm, logp_s, reduction="none", log_target=True
        )
    return jsd.sum() / jsd.size(0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_convention(impl, beta, temperature):
    s, t = make_logits(6, 400, torch.float64, "normal")
    expected = trl_generalized_jsd_loss(s, t, beta=beta, temperature=temperature)
    out = token_divergence(s.float(), t.float(), "jsd", beta=beta, temperature=temperature, impl=impl)
    torch.testing.assert_close(out.double().mean(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.compare
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_generalized_jsd_loss_itself(beta):
    gkd = pytest.importorskip("trl.experimental.gkd", reason="trl (the `compare` extra) not installed")
    s, t = make_logits(6, 400, torch.float64, "normal")
    expected = gkd.GKDTrainer.generalized_jsd_loss(s, t, beta=beta, temperature=1.5)
    torch.testing.assert_close(trl_generalized_jsd_loss(s, t, beta=beta, temperature=1.5), expected)
    out = token_divergence(s, t, "jsd", beta=beta, temperature=1.5)
    torch.testing.assert_close(out.double().mean(), expected, rtol=1e-6, atol=1e-7)


def _liger(module: str):
    if not triton_available(torch.device("cpu")):
        pytest.skip("Liger's Triton kernels need TRITON_INTERPRET=1 on CPU")
    return pytest.importorskip(module, reason="liger-kernel (the `compare` extra) not installed")


def _run_liger(fn, *args):
    """Liger's kl_div and tvd kernels call `.to` on a Python float argument, which a compiled kernel
    receives as a typed scalar but the Triton interpreter as a bare float: the `liger_on_interpreter`
    fixture (conftest.py) passes floats that accept it, so these comparisons run on CPU as well."""
    return fn(*args)


@pytest.mark.compare
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_liger_jsd(beta):
    """Liger's JSD takes log-probs (student input, teacher target) and returns the batch mean."""
    jsd = _liger("liger_kernel.ops.jsd")
    s, t = make_logits(4, 700, torch.float32, "normal")
    loss = jsd.LigerJSDFunction.apply(s.log_softmax(-1), t.log_softmax(-1), None, beta, -100)
    out = token_divergence(s, t, "jsd", beta=beta)
    torch.testing.assert_close(out.mean(), loss.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.compare
@pytest.mark.usefixtures("liger_on_interpreter")
def test_liger_tvd():
    tvd = _liger("liger_kernel.ops.tvd")
    s, t = make_logits(4, 700, torch.float32, "normal")
    per_entry = _run_liger(tvd.LigerTVDLossFunction.apply, t.softmax(-1), s.softmax(-1), None, "none")
    torch.testing.assert_close(token_divergence(s, t, "tvd"), per_entry.float().sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.compare
@pytest.mark.usefixtures("liger_on_interpreter")
def test_liger_kl_div():
    """Liger's kl_div(input = student log-probs, target = teacher log-probs) is forward KL."""
    kl = _liger("liger_kernel.ops.kl_div")
    s, t = make_logits(4, 700, torch.float32, "normal")
    logp_s, logp_t = s.log_softmax(-1), t.log_softmax(-1)
    per_entry = _run_liger(kl.LigerKLDivLossFunction.apply, logp_s, logp_t, "none", True, 1e-10)
    out = token_divergence(s, t, "forward_kl")
    torch.testing.assert_close(out, per_entry.float().sum(-1), rtol=1e-5, atol=1e-6)


def test_op_example_table(capsys):
    """`python examples/op_example.py`: every kind, implementations agree."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "op_example.py"
    spec = importlib.util.spec_from_file_location("op_example", path)
    op_example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(op_example)

    op_example.main(["--rows", "3", "--vocab", "257", "--repeats", "1"])
    table = capsys.readouterr().out
    for kind in KINDS:
        assert kind in table
    records = op_example.run(rows=3, vocab=257, repeats=1)
    assert {r["impl"] for r in records} >= {"torch"}
    assert all(r["max_abs_diff"] < 1e-5 and r["ms"] > 0 for r in records)


_AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adaswitch.kernels.triton.divergence import _divergence_kernel
for dtype, modes in (("bf16", range(4)), ("fp32", [0])):
    sig = {"X": "*" + dtype, "Y": "*" + dtype, "OUT": "*fp32", "stride_x_row": "i64", "stride_x_col": "i32",
           "stride_y_row": "i64", "stride_y_col": "i32", "V": "i32", "scale": "fp32", "w": "fp32",
           "MODE": "constexpr", "BLOCK": "constexpr"}
    for mode in modes:
        src = ASTSource(fn=_divergence_kernel, signature=sig, constexprs={"MODE": mode, "BLOCK": 4096})
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        assert kernel.asm["cubin"], (dtype, mode)
print("compiled")
"""


def test_triton_kernel_compiles_for_hopper():
    """No GPU in CI: compile the kernel ahead of time for sm_90 (every mode in bf16, through the
    ptxas that ships with Triton), so a construct that only the interpreter accepts fails here rather
    than on the first GPU run. In a subprocess: the interpreter (TRITON_INTERPRET=1) must be off."""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _AOT_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]
