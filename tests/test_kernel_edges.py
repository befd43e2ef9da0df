"""Edges of the kernels that the main suites do not reach:

- -inf logits on either side, including where exp underflows in fp32: fused_step's divergence ==
  token_divergence == the float64-faithful reference (+inf, never NaN), on every backend;
- SKD drafts outside the vocabulary: rejected on every backend (the kernel never reads them);
- the tile loops: with the kernels' BLOCK forced down to 16 (adaswitch.kernels.triton.launch.max_block)
  a row spans several tiles, so the online log-sum-exp rescaling and the later passes run; the results
  must match the one-tile launch and the reference (loss and gradient, divergence, step and lookahead).
"""

import math

import pytest
import torch

from adaswitch import reference
from adaswitch._backend import native_available, native_ops
from adaswitch._validation import KINDS
from adaswitch.kernels.triton import launch
from adaswitch.ops import SwitchState, distill_loss, fused_lookahead, fused_step, token_divergence
from adaswitch.ops.loss import reference_distill_loss
from adaswitch.policies import SKD, AdaSwitch, Sampling, Student, Teacher

NATIVE = pytest.param("native", marks=pytest.mark.skipif(
    not (native_available() and hasattr(native_ops(), "gumbel_argmax")), reason="adaswitch._C not built"))
IMPLS = ["torch", "triton", NATIVE]
EOS, PAD = 1, 0


def inf_rows(vocab=40):
    """Student / teacher rows with -inf on one side, the other's exp underflowing there, and an -inf
    in an early tile followed by a larger maximum in a later one (the running sum is rescaled by 0)."""
    s = torch.randn(8, vocab)
    t = torch.randn(8, vocab)
    s[0, 5] = -math.inf  # teacher mass where the student is -inf: forward KL +inf
    t[1, 0] = 200.0
    s[1, 7] = -math.inf  # ... also where exp(t - max t) underflows in fp32
    t[2, 3] = -math.inf  # student mass where the teacher is -inf: reverse KL +inf
    s[3, 0] = 200.0
    t[3, 9] = -math.inf  # ... also where exp(s - max s) underflows
    s[4, 2] = -math.inf  # -inf in the first tile, the row's maximum in the last
    t[4, vocab - 1] = 300.0
    t[5, 2] = -math.inf
    s[5, vocab - 1] = 300.0
    s[6, -4:] = t[6, -4:] = -math.inf  # a masked (padded) vocabulary on both sides: finite
    t[7, :] = -math.inf  # all -inf: NaN
    return s, t


def same(a, b, rtol=2e-5, atol=2e-5):
    """Equal infinities and NaNs, close finite values."""
    a, b = a.double(), b.double()
    return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)) and \
        torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]) and \
        torch.allclose(a[torch.isfinite(a)], b[torch.isfinite(b)], rtol=rtol, atol=atol)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
def test_step_divergence_is_the_reference_on_inf_rows(kind, impl, block):
    s, t = inf_rows()
    policy = AdaSwitch(window=2, k=2.0, divergence=kind, beta=0.3, alpha=0.2)
    ref = reference.divergence_rows(s.double(), t.double(), kind, beta=0.3, alpha=0.2, dtype=torch.float64)
    with launch.max_block(block):
        div = token_divergence(s, t, kind, beta=0.3, alpha=0.2, impl=impl)
        state = SwitchState.new(s.shape[0], 2)
        step = fused_step(s, t, policy, state, seed=3, keys=torch.arange(s.shape[0]),
                          position=torch.zeros(s.shape[0], dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD,
                          impl=impl).divergence
    assert same(div, ref.float(), rtol=1e-4, atol=1e-5), (div, ref)
    assert same(step, div, rtol=1e-4, atol=1e-5), (step, div)
    if kind == "forward_kl":
        assert torch.isinf(step[[0, 1, 4]]).all()
    if kind == "reverse_kl":
        assert torch.isinf(step[[2, 3, 5]]).all()
    assert torch.isfinite(step[6]) and torch.isnan(step[7])


def _draft_case(vocab=30, g=5):
    s = torch.randn(2, g, vocab)
    t = torch.randn(2, g, vocab)
    draft = torch.randint(0, vocab, (2, g))
    draft[0, 2] = vocab  # just past the end
    draft[1, 1] = -1
    draft[1, 3] = 1 << 40
    draft[draft == EOS] = 2
    return s, t, draft


@pytest.mark.parametrize("impl", IMPLS)
def test_out_of_vocabulary_drafts_are_rejected(impl):
    s, t, draft = _draft_case()
    policy = SKD(top_k=t.shape[-1])  # every draft inside the vocabulary is in the teacher's top-k
    state = SwitchState.new(2)
    out = fused_lookahead(s, t, draft, policy, state, seed=5, keys=torch.arange(2),
                          position=torch.zeros(2, dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD, impl=impl)
    assert out.accepted.tolist() == [2, 1]
    assert out.from_teacher.all()
    ref_state = SwitchState.new(2)
    ref = fused_lookahead(s, t, draft, policy, ref_state, seed=5, keys=torch.arange(2),
                          position=torch.zeros(2, dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD,
                          impl="torch")
    assert torch.equal(out.token, ref.token) and torch.equal(out.accepted, ref.accepted)
    # policies that never read logits at a draft id pass it through untouched
    for other in (Student(), AdaSwitch(window=2, k=1e9)):
        st = SwitchState.new(2, getattr(other, "window", 1))
        res = fused_lookahead(s, t, draft, other, st, seed=5, keys=torch.arange(2),
                              position=torch.zeros(2, dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD,
                              impl=impl)
        assert res.accepted.tolist() == [5, 5]


# ------------------------------------------------------------------------------------------- tile loops

def tiled_logits(rows=6, vocab=100, dtype=torch.float32):
    """Logits whose running maximum grows tile after tile (so every rescale matters), with -inf entries."""
    ramp = torch.linspace(0, 12, vocab)
    s = (torch.randn(rows, vocab) * 2 + ramp).to(dtype)
    t = (torch.randn(rows, vocab) * 2 + ramp.flip(0) * (torch.arange(rows)[:, None] % 2 * 2 - 1)).to(dtype)
    s[0, 17] = -math.inf
    t[1, 50] = -math.inf
    s[2, -3:] = t[2, -3:] = -math.inf
    return s, t


@pytest.mark.parametrize("kind", KINDS)
def test_loss_kernel_several_tiles(kind):
    s, t = tiled_logits()
    labels = torch.tensor([0, 1, -100, 3, 4, 5])
    results = []
    for block in (None, 16):
        x = s.clone().requires_grad_()
        with launch.max_block(block):
            loss = distill_loss(x, t, kind, beta=0.3, alpha=0.2, temperature=1.7, labels=labels, impl="triton")
            loss.backward()
        results.append((loss.detach(), x.grad))
    x = s.double().requires_grad_()
    ref = reference_distill_loss(x, t.double(), kind, beta=0.3, alpha=0.2, temperature=1.7, labels=labels)
    ref.backward()
    # compared where the reference's autograd is finite (not at -inf logits) on rows of finite loss
    # (reverse KL is +inf where the teacher is -inf: every backend's gradient is then NaN)
    rows = reference.divergence_rows(s.double(), t.double(), kind, beta=0.3, alpha=0.2, temperature=1.7,
                                     dtype=torch.float64)
    ok = torch.isfinite(x.grad) & torch.isfinite(rows)[:, None]
    for loss, grad in results:
        assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=1e-6), (kind, loss, ref)
        assert torch.allclose(grad.double()[ok], x.grad[ok], rtol=1e-4, atol=2e-5), kind
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-5, atol=1e-7, equal_nan=True)


def test_loss_kernel_several_tiles_no_grad_bf16():
    s, t = tiled_logits(dtype=torch.bfloat16)
    with launch.max_block(16):
        small = distill_loss(s, t, "jsd", reduction="none", impl="triton")
    big = distill_loss(s, t, "jsd", reduction="none", impl="triton")
    assert torch.allclose(small, big, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_kernel_several_tiles(kind):
    s, t = tiled_logits()
    ref = reference.divergence_rows(s.double(), t.double(), kind, beta=0.3, alpha=0.2, temperature=0.8,
                                    dtype=torch.float64)
    with launch.max_block(16):
        small = token_divergence(s, t, kind, beta=0.3, alpha=0.2, temperature=0.8, impl="triton")
        transposed = token_divergence(s.t().contiguous().t(), t.t().contiguous().t(), kind, beta=0.3, alpha=0.2,
                                      temperature=0.8, impl="triton")
    big = token_divergence(s, t, kind, beta=0.3, alpha=0.2, temperature=0.8, impl="triton")
    assert same(small, ref.float(), rtol=1e-4) and same(small, big) and same(transposed, small)


def test_max_block_from_the_environment(monkeypatch):
    monkeypatch.setenv("ADASWITCH_TRITON_MAX_BLOCK", "16")
    assert launch.tile(1000, 4096) == 16
    monkeypatch.delenv("ADASWITCH_TRITON_MAX_BLOCK")
    assert launch.tile(1000, 4096) == 1024
    with pytest.raises(ValueError):
        launch.set_max_block(24)


STEP_POLICIES = [
    Student(Sampling(0.7, top_p=0.8)),
    Teacher(Sampling(1.3, top_k=6)),
    SKD(top_k=4, student_sampling=Sampling(0.5), teacher_sampling=Sampling(0.2, top_p=0.5)),
    *[AdaSwitch(window=2, k=1.1, divergence=kind, beta=0.3, alpha=0.2, teacher_sampling=Sampling(0)) for kind in KINDS],
]


@pytest.mark.parametrize("policy", STEP_POLICIES, ids=lambda p: type(p).__name__ + getattr(p, "divergence", ""))
def test_step_kernels_several_tiles(policy):
    steps, rows, vocab = 3, 4, 100
    s, t = tiled_logits(steps * rows, vocab)
    s, t = s.view(steps, rows, vocab), t.view(steps, rows, vocab)
    window = getattr(policy, "window", 1)
    outs = {}
    for block in (None, 16):
        state = SwitchState.new(rows, window)
        with launch.max_block(block):
            outs[block] = [fused_step(s[i], t[i], policy, state, seed=9, keys=torch.arange(rows),
                                      position=torch.full((rows,), i), eos_token_id=EOS, pad_token_id=PAD,
                                      impl="triton") for i in range(steps)], state
    for a, b in zip(outs[None][0], outs[16][0]):
        assert torch.equal(a.token, b.token) and torch.equal(a.from_teacher, b.from_teacher)
        assert same(a.divergence, b.divergence)
    assert torch.equal(outs[None][1].switched, outs[16][1].switched)
    if isinstance(policy, (SKD, AdaSwitch)):
        sg, tg = s.transpose(0, 1).contiguous(), t.transpose(0, 1).contiguous()
        draft = torch.randint(2, vocab, (rows, steps))
        res = {}
        for block in (None, 16):
            state = SwitchState.new(rows, window)
            with launch.max_block(block):
                res[block] = fused_lookahead(sg, tg, draft, policy, state, seed=9, keys=torch.arange(rows),
                                             position=torch.zeros(rows, dtype=torch.long), eos_token_id=EOS,
                                             pad_token_id=PAD, impl="triton")
        assert torch.equal(res[None].accepted, res[16].accepted) and torch.equal(res[None].token, res[16].token)
        assert same(res[None].divergence, res[16].divergence)
