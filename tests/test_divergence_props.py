"""Property tests (hypothesis) of token_divergence on every implementation: the divergences are
non-negative, zero on identical rows, TVD is at most 1 and JSD(beta = 0.5) is symmetric.

Inputs are small rows (the Triton interpreter is slow) of bounded logits with random -inf masks that
always leave each row at least one finite entry, in float32, bfloat16 and float16.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaswitch import token_divergence
from adaswitch._backend import native_available, triton_available
from adaswitch._validation import KINDS

IMPLS = ["torch"]
if native_available():
    IMPLS.append("native")
if triton_available(torch.device("cpu")):
    IMPLS.append("triton")

SLACK = 2e-6  # float32 rounding around 0 (the KL cancellation E[x - y] - lse_x + lse_y)

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
]


@st.composite
def logit_pairs(draw):
    """(student, teacher) [rows, vocab] with logits in [-30, 30] and optional -inf masks."""
    rows = draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 10.0, 30.0]))
    gen = torch.Generator().manual_seed(seed)
    s = (torch.rand(rows, vocab, generator=gen) * 2 - 1) * scale
    t = (torch.rand(rows, vocab, generator=gen) * 2 - 1) * scale
    if draw(st.booleans()):
        keep = torch.randint(0, vocab, (rows, 1), generator=gen)
        for x in (s, t):
            mask = torch.rand(rows, vocab, generator=gen) < 0.4
            mask.scatter_(1, keep, False)  # one entry both sides keep finite
            x.masked_fill_(mask, -math.inf)
    return s.to(dtype), t.to(dtype)


def _params():
    return dict(
        kind=st.sampled_from(KINDS),
        beta=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
        alpha=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
        temperature=st.sampled_from([0.5, 1.0, 2.0]),
    )


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=40, deadline=None)
@given(pair=logit_pairs(), **_params())
def test_non_negative(impl, pair, kind, beta, alpha, temperature):
    s, t = pair
    out = token_divergence(s, t, kind, beta=beta, alpha=alpha, temperature=temperature, impl=impl)
    assert not torch.isnan(out).any()
    assert (out >= -SLACK).all(), out


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30, deadline=None)
@given(pair=logit_pairs(), **_params())
def test_zero_on_identical_rows(impl, pair, kind, beta, alpha, temperature):
    s, _ = pair
    out = token_divergence(s, s.clone(), kind, beta=beta, alpha=alpha, temperature=temperature, impl=impl)
    assert out.abs().max().item() <= SLACK


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30, deadline=None)
@given(pair=logit_pairs(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_tvd_at_most_one(impl, pair, temperature):
    s, t = pair
    out = token_divergence(s, t, "tvd", temperature=temperature, impl=impl)
    # sum |p - q| / 2 of two float32 distributions that each sum to 1 within a few ulps per entry
    assert ((out >= 0) & (out <= 1 + 1e-5)).all(), out


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=30, deadline=None)
@given(pair=logit_pairs(), temperature=st.sampled_from([0.5, 1.0, 2.0]))
def test_jsd_half_symmetric(impl, pair, temperature):
    s, t = pair
    a = token_divergence(s, t, "jsd", beta=0.5, temperature=temperature, impl=impl)
    b = token_divergence(t, s, "jsd", beta=0.5, temperature=temperature, impl=impl)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=SLACK)
    assert (a <= math.log(2) + SLACK).all()  # JSD(0.5) <= ln 2
