"""Counter-based RNG: bit equality torch vs Triton, uniformity, and sampled distributions that converge
to their targets (the vLLM rejection-sampler style of check)."""

import math

import pytest
import torch

from adaswitch._backend import native_available, native_ops
from adaswitch.kernels.triton.step import uniform_triton
from adaswitch.ops import rng
from adaswitch.policies import Sampling

# chi-square critical values at p = 0.001 (deterministic draws: a fixed seed cannot flake)
CHI2_999 = {7: 24.32, 19: 43.82, 49: 85.35}


def chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_bits_match_triton():
    keys = torch.tensor([0, 1, -7, 2**40 + 3, 12345])
    pos = torch.tensor([0, 511, 3, 2**33 + 1, 7])
    for seed in (0, 2**63 + 5, -1):
        for stream in (0, 1, 2):
            ref = rng.uniform(seed, keys, pos, stream, 333)
            assert torch.equal(ref, uniform_triton(seed, keys, pos, stream, 333))


def test_open_interval_and_pure_function():
    keys = torch.arange(64)
    u = rng.uniform(7, keys, torch.zeros(64, dtype=torch.long), 0, 1024)
    assert u.dtype == torch.float32 and float(u.min()) > 0 and float(u.max()) < 1
    again = rng.uniform(7, keys.flip(0), torch.zeros(64, dtype=torch.long), 0, 1024).flip(0)
    assert torch.equal(u, again)  # no dependence on row order
    assert not torch.equal(u, rng.uniform(8, keys, torch.zeros(64, dtype=torch.long), 0, 1024))
    assert not torch.equal(u, rng.uniform(7, keys, torch.ones(64, dtype=torch.long), 0, 1024))
    assert not torch.equal(u, rng.uniform(7, keys, torch.zeros(64, dtype=torch.long), 1, 1024))


def test_uniform_histogram():
    u = rng.uniform(0, torch.arange(50), torch.arange(50) * 3, 1, 4000).flatten()  # 200k draws
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert chi2(counts, torch.full((20,), u.numel() / 20)) < CHI2_999[19]
    # neighbouring indices, positions and streams are uncorrelated
    a = rng.uniform(0, torch.arange(50), torch.zeros(50, dtype=torch.long), 0, 4000)
    b = rng.uniform(0, torch.arange(50), torch.ones(50, dtype=torch.long), 0, 4000)
    c = rng.uniform(0, torch.arange(50), torch.zeros(50, dtype=torch.long), 1, 4000)
    for x, y in ((a, b), (a, c), (a[:, :-1], a[:, 1:])):
        corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.01


def _draws(logits, sampling, n=20000):
    keys = torch.arange(n)
    return rng.sample(logits.expand(n, -1), sampling, seed=3, keys=keys, positions=keys % 7, stream=0)


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_gumbel_max_converges_to_softmax(temperature):
    logits = torch.tensor([[1.0, -0.5, 2.0, 0.0, 0.3, -2.0, 1.5, -math.inf]])
    counts = torch.bincount(_draws(logits, Sampling(temperature)), minlength=8).double()
    p = torch.softmax(logits.double() / temperature, -1)[0]
    assert counts[7] == 0
    assert chi2(counts[:7], p[:7] * counts.sum()) < CHI2_999[7]


def test_top_k_and_top_p_restrict_then_renormalise():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.2, -3.0, 0.2]])
    p = torch.softmax(logits.double(), -1)[0]
    top3 = torch.tensor([0, 5, 1])
    counts = torch.bincount(_draws(logits, Sampling(top_k=3)), minlength=8).double()
    assert counts.sum() == counts[top3].sum()
    q = p[top3] / p[top3].sum()
    assert chi2(counts[top3], q * counts.sum()) < CHI2_999[7]
    # smallest prefix of the sorted probabilities reaching top_p: here {0, 5, 1, 2}
    order = torch.argsort(p, descending=True)
    n_keep = int((p[order].cumsum(0) < 0.7).sum()) + 1
    keep = order[:n_keep]
    counts = torch.bincount(_draws(logits, Sampling(top_p=0.7)), minlength=8).double()
    assert counts.sum() == counts[keep].sum() and (counts[keep] > 0).all()
    q = p[keep] / p[keep].sum()
    assert chi2(counts[keep], q * counts.sum()) < CHI2_999[7]


def test_filter_threshold_ties_and_temperature():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    assert float(rng.filter_threshold(x, 2, 1.0)[0]) == 3.0
    assert float(rng.filter_threshold(x, 3, 1.0)[0]) == 2.0  # both 2.0 entries survive
    assert float(rng.filter_threshold(x, 0, 1.0)[0]) == -math.inf
    assert float(rng.filter_threshold(x, 6, 1.0)[0]) == -math.inf
    # top_p is measured on the (temperature-scaled) distribution it is given
    hot, cold = rng.scale_logits(x, 10.0), rng.scale_logits(x, 0.1)
    assert float(rng.filter_threshold(cold, 0, 0.9)[0]) == float(cold.max())
    assert float(rng.filter_threshold(hot, 0, 0.9)[0]) < float(hot.max())


def test_greedy_ties_to_lowest_id():
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [7.0, 7.0, 7.0, 7.0]])
    zero = torch.zeros(2, dtype=torch.long)
    tok = rng.sample(logits, Sampling(0), seed=0, keys=torch.arange(2), positions=zero, stream=0)
    assert tok.tolist() == [1, 0]


def test_mixed_coin():
    keys = torch.arange(20000)
    frac = float(rng.mixed_coin(1, keys, 0.3).double().mean())
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 20000)
    assert not rng.mixed_coin(1, keys, 0.0).any() and rng.mixed_coin(1, keys, 1.0).all()
    assert torch.equal(rng.mixed_coin(1, keys[:10], 0.5), rng.mixed_coin(1, keys, 0.5)[:10])


def test_seed_validation():
    for bad in (1.5, True, 2**64, -(2**63) - 1, "0"):
        with pytest.raises(TypeError, match="seed"):
            rng.check_seed(bad)


NO_NATIVE = not (native_available() and hasattr(native_ops(), "gumbel_argmax"))


@pytest.mark.skipif(NO_NATIVE, reason="adaswitch._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_native_draws_match_reference(dtype):
    """kernels/csrc/step.cpp draws the same tokens as rng.sample (same bits, same score arithmetic)."""
    x = (torch.randn(48, 1500) * 3).to(dtype)
    x[:, 1400:] = -math.inf
    keys, pos = torch.arange(48) * 5 - 7, torch.arange(48)
    samplings = (Sampling(), Sampling(0.7), Sampling(1.3, top_k=20), Sampling(0.9, top_p=0.8), Sampling(0))
    for sampling in samplings:
        thr = None
        if sampling.filtered:
            scaled = rng.scale_logits(x, sampling.temperature)
            thr = rng.filter_threshold(scaled, sampling.top_k, sampling.top_p)
        inv = 1.0 if sampling.greedy else 1.0 / sampling.temperature
        got = native_ops().gumbel_argmax(x, keys, pos, rng.seed_hash(11), 1, inv, thr, sampling.greedy)
        if not sampling.greedy:  # rows_needed: skipped rows give 0, the others are unchanged
            need = torch.arange(48) % 3 == 0
            part = native_ops().gumbel_argmax(x, keys, pos, rng.seed_hash(11), 1, inv, thr, False, need)
            assert torch.equal(part, torch.where(need, got, 0))
        assert torch.equal(got, rng.sample(x, sampling, seed=11, keys=keys, positions=pos, stream=1))


@pytest.mark.skipif(NO_NATIVE, reason="adaswitch._C not built")
def test_native_op_checks_its_arguments():
    op = native_ops().gumbel_argmax
    x, keys = torch.randn(3, 10), torch.arange(3)
    with pytest.raises(RuntimeError, match="keys"):
        op(x, keys.int(), keys, 0, 0, 1.0, None, False)
    with pytest.raises(RuntimeError, match="threshold"):
        op(x, keys, keys, 0, 0, 1.0, torch.zeros(2), False)
    with pytest.raises(RuntimeError, match="logits"):
        op(x[0], keys, keys, 0, 0, 1.0, None, False)
    with pytest.raises(RuntimeError, match="rows_needed"):
        op(x, keys, keys, 0, 0, 1.0, None, False, keys)
