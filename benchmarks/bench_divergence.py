"""pytest-benchmark suite for token_divergence on CPU (not part of the test run: timings, no asserts
on speed). Each case first checks the result against the float64 reference, then times it.

    python -m pytest benchmarks/bench_divergence.py --benchmark-enable --benchmark-group-by=param

Implementations: "eager" (adaswitch.reference in float32), "compiled" (the same through
torch.compile), "native" (adaswitch._C_*, the variant built for this CPU). Triton on CPU only runs
under the interpreter and is timed on a GPU instead (benchmarks/gpu/bench_divergence_gpu.py). For
the one-run ratio table and the committed results see benchmarks/divergence_ratios.py.
"""

from __future__ import annotations

import functools

import pytest
import torch

from adaswitch import reference, token_divergence
from adaswitch._backend import native_available

SHAPES = {"8x32000": (8, 32000), "64x32000": (64, 32000), "64x151936": (64, 151936)}
KINDS = ("forward_kl", "jsd", "tvd")


@functools.cache
def _compiled(kind: str):
    return torch.compile(lambda s, t: reference.divergence_rows(s, t, kind), dynamic=False)


def _runner(impl: str, kind: str):
    if impl == "eager":
        return lambda s, t: reference.divergence_rows(s, t, kind)
    if impl == "compiled":
        return _compiled(kind)
    if impl == "native" and not native_available():
        pytest.skip("adaswitch._C_* not built")
    return lambda s, t: token_divergence(s, t, kind, impl=impl)


@pytest.mark.parametrize("impl", ["eager", "compiled", "native"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_divergence(benchmark, impl, kind, shape):
    rows, vocab = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(rows, vocab, generator=gen) * 2
    t = s + torch.randn(rows, vocab, generator=gen)
    fn = _runner(impl, kind)
    with torch.no_grad():
        expected = reference.divergence_rows(s.double(), t.double(), kind, dtype=torch.float64)
        torch.testing.assert_close(fn(s, t).double(), expected, rtol=1e-4, atol=1e-5)
        benchmark.extra_info.update(rows=rows, vocab=vocab, gbytes=2 * s.numel() * s.element_size() / 1e9)
        benchmark(fn, s, t)
