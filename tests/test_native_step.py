"""The native decision ops (step_decide / lookahead_decide in kernels/csrc/step.cpp) against the PyTorch
reference, bit for bit: crafted divergence sequences (fed to both through adaswitch.ops.step._divergence)
where rows switch at varied positions through the relative trigger after the warm-up, the absolute trigger,
+inf, with NaN skipped, the floor, and the scheduled controls; finished rows; lookahead blocks; and windows
whose sum rounds differently in another order, with d exactly at the threshold."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaswitch._backend import native_ops
from adaswitch.ops import SwitchState, fused_lookahead, fused_step
from adaswitch.ops import step as step_mod
from adaswitch.policies import SKD, AdaSwitch, FixedSwitch, RandomSwitch, Sampling, Student, Teacher

pytestmark = pytest.mark.skipif(native_ops() is None or not hasattr(native_ops(), "step_decide"),
                                reason="adaswitch._C (step_decide) not built")

B, N, V, G = 24, 30, 16, 5
EOS, PAD = 15, 14

POLICIES = [
    AdaSwitch(window=4, k=2.0, warmup=6, min_divergence=0.3, max_divergence=5.0),
    AdaSwitch(window=3, k=1.5),
    AdaSwitch(window=16, k=1.2, max_divergence=8.0),  # long enough for torch to sum it in vector lanes
    AdaSwitch(window=5, k=math.inf, max_divergence=4.0),  # only the absolute trigger and +inf
    FixedSwitch(window=4, position=5),
    RandomSwitch(window=4, positions=(2, 7, -1, 11)),
]


def crafted(seed=0):
    """Divergences [N, B]: calm rows with spikes (relative trigger), values above 5 and exactly 5 (the first
    policy's A), values below its F, NaN and +inf at random positions."""
    gen = torch.Generator().manual_seed(seed)
    d = 0.2 + 0.8 * torch.rand(N, B, generator=gen)
    spikes = torch.rand(N, B, generator=gen) < 0.08
    d = torch.where(spikes, d * (1.5 + 4.5 * torch.rand(N, B, generator=gen)), d)
    r = torch.rand(N, B, generator=gen)
    d = torch.where(r < 0.05, torch.full_like(d, math.nan), d)
    d = torch.where((r > 0.05) & (r < 0.07), torch.full_like(d, math.inf), d)
    d = torch.where((r > 0.07) & (r < 0.09), torch.full_like(d, 5.0), d)
    d = torch.where((r > 0.09) & (r < 0.11), 6.0 + d, d)
    d = torch.where((r > 0.11) & (r < 0.14), 0.1 * d, d)
    return d.float()


def logits(seed=1, shape=(N, B, V)):
    """Student and teacher logits; EOS likely at a few (position, row) pairs so that rows finish."""
    gen = torch.Generator().manual_seed(seed)
    s, t = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    eos_here = torch.rand(shape[:-1], generator=gen) < 0.03
    s[..., EOS] = torch.where(eos_here, 8.0, -4.0)
    t[..., EOS] = torch.where(eos_here, 8.0, -4.0)
    return s, t


def feed(monkeypatch, values):
    """Make _divergence return the next crafted tensor on every call (both implementations call it)."""
    it = iter(values)
    monkeypatch.setattr(step_mod, "_divergence", lambda *args, **kwargs: next(it).clone())


def run_steps(monkeypatch, policy, impl, d, s, t):
    state = SwitchState.new(B, policy.window)
    keys = torch.arange(B) * 7 + 3
    feed(monkeypatch, list(d))
    outs = [fused_step(s[i], t[i], policy, state, seed=5, keys=keys, position=torch.full((B,), i),
                       eos_token_id=EOS, pad_token_id=PAD, impl=impl) for i in range(N)]
    return state, outs


def assert_same_state(a, b):
    for name in ("window", "count", "switched", "switch_pos", "finished"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def assert_same_divergence(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # bit for bit, NaN where NaN


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{type(p).__name__}-L{p.window}")
def test_native_rule_matches_the_reference(monkeypatch, policy):
    d = crafted()
    s, t = logits()
    ref, ref_outs = run_steps(monkeypatch, policy, "torch", d, s, t)
    nat, nat_outs = run_steps(monkeypatch, policy, "native", d, s, t)
    assert_same_state(nat, ref)
    for a, b in zip(nat_outs, ref_outs):
        assert torch.equal(a.token, b.token) and torch.equal(a.from_teacher, b.from_teacher)
        assert_same_divergence(a.divergence, b.divergence)
    # the inputs exercise the rule: switches at many positions, rows that never switch, finished rows
    pos = ref.switch_pos[ref.switched]
    assert len(set(pos.tolist())) >= (3 if isinstance(policy, RandomSwitch) else 1)
    assert ref.finished.any()
    if type(policy) is AdaSwitch:
        assert len(set(pos.tolist())) >= 5 and not ref.switched.all()


@pytest.mark.parametrize("policy", POLICIES + [SKD(top_k=3), Student(), Teacher()],
                         ids=lambda p: f"{type(p).__name__}-L{getattr(p, 'window', 0)}")
def test_native_lookahead_matches_the_reference(monkeypatch, policy):
    d = crafted(2)
    s, t = logits(3, (B, N, V))
    gen = torch.Generator().manual_seed(4)
    draft = torch.randint(0, V, (B, N), generator=gen)
    draft[:, 3] = V + 2  # an SKD draft outside the vocabulary is rejected
    results = {}
    for impl in ("torch", "native"):
        state = SwitchState.new(B, getattr(policy, "window", 1))
        keys = torch.arange(B) * 7 + 3
        blocks = [d[j:j + G].transpose(0, 1).reshape(-1) for j in range(0, N, G)]
        feed(monkeypatch, blocks)
        outs = [fused_lookahead(s[:, j:j + G], t[:, j:j + G], draft[:, j:j + G], policy, state, seed=5, keys=keys,
                                position=torch.full((B,), j), eos_token_id=EOS, pad_token_id=PAD, impl=impl)
                for j in range(0, N, G)]
        results[impl] = state, outs
    (ref, ref_outs), (nat, nat_outs) = results["torch"], results["native"]
    assert_same_state(nat, ref)
    for a, b in zip(nat_outs, ref_outs):
        for name in ("accepted", "token", "from_teacher"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert_same_divergence(a.divergence, b.divergence)
    if type(policy) is AdaSwitch:
        assert len(set(ref.switch_pos[ref.switched].tolist())) >= 3


@pytest.mark.parametrize("sampling", [Sampling(0.0), Sampling(0.7, top_k=4), Sampling(1.3, top_p=0.8)],
                         ids=["greedy", "top_k", "top_p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_matches_the_eager_native_draws(sampling, dtype):
    """The one-call step against the per-op native path (same draw code): tokens identical."""
    s, t = logits(6, (B, V))
    s, t = s.to(dtype), t.to(dtype)
    for policy in (AdaSwitch(window=2, k=1.1, student_sampling=sampling, teacher_sampling=sampling),
                   SKD(top_k=2, student_sampling=sampling, teacher_sampling=sampling), Student(sampling),
                   Teacher(sampling)):
        states = [SwitchState.new(B, getattr(policy, "window", 1)) for _ in range(2)]
        keys = torch.arange(B)
        for i in range(6):
            pos = torch.full((B,), i)
            args = (s if policy.uses_student else None, t if policy.uses_teacher else None, policy)
            a = step_mod._step_native(*args, states[0], 9, keys, pos, EOS, PAD)
            b = step_mod._step_eager(*args, states[1], 9, keys, pos, EOS, PAD, True)
            for name in ("token", "from_teacher"):
                assert torch.equal(getattr(a, name), getattr(b, name)), (type(policy).__name__, name)
            assert_same_divergence(a.divergence, b.divergence)
        assert_same_state(states[0], states[1])


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def test_native_step_is_one_decision_op():
    """With impl="native" a step is the divergence op and one decision op (no PyTorch ops around them), so
    the equality tests above test the C++ rule, not a fallback."""
    s, t = logits(10, (B, V))
    keys, pos = torch.arange(B), torch.zeros(B, dtype=torch.long)
    for policy, want in ((AdaSwitch(window=2), ["adaswitch::token_divergence", "adaswitch::step_decide"]),
                         (SKD(top_k=2), ["adaswitch::step_decide"]), (Student(), ["adaswitch::step_decide"])):
        state = SwitchState.new(B, getattr(policy, "window", 1))
        with OpLog() as log:
            fused_step(s, t if policy.uses_teacher else None, policy, state, seed=0, keys=keys, position=pos,
                       eos_token_id=EOS, pad_token_id=PAD, impl="native")
        assert log.names == want, type(policy).__name__
    state = SwitchState.new(B, 2)
    s3, t3, draft = s[:, None].contiguous(), t[:, None].contiguous(), torch.zeros(B, 1, dtype=torch.long)
    with OpLog() as log:
        fused_lookahead(s3, t3, draft, AdaSwitch(window=2), state, seed=0, keys=keys, position=pos,
                        eos_token_id=EOS, pad_token_id=PAD, impl="native")
    ops = [name for name in log.names if name != "aten::view"]  # (the [B * G, V] views of the logits)
    assert ops == ["adaswitch::token_divergence", "adaswitch::lookahead_decide"]


def test_a_state_the_native_op_cannot_update_in_place_takes_the_pytorch_ops(monkeypatch):
    """A non-contiguous window (a view) is still updated, by the PyTorch ops, exactly as the reference."""
    d = crafted(11)
    s, t = logits(12)
    policy = AdaSwitch(window=4, k=2.0, max_divergence=5.0)
    states = {}
    for impl in ("torch", "native"):
        state = SwitchState.new(B, 4)
        state.window = torch.zeros(4, B).t()
        feed(monkeypatch, list(d))
        for i in range(N):
            fused_step(s[i], t[i], policy, state, seed=5, keys=torch.arange(B), position=torch.full((B,), i),
                       eos_token_id=EOS, pad_token_id=PAD, impl=impl)
        states[impl] = state
    assert not states["native"].window.is_contiguous() and states["torch"].switched.any()
    assert_same_state(states["native"], states["torch"])


# ------------------------------------------------------------------------------- the window sum's order

def cancelling_windows(length, rows, seed):
    """float32 windows [rows, L] of +-2^60 pairs and small integers: sums that depend on the order."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(rows, length)
    for r in range(rows):
        slots = torch.randperm(length, generator=gen).tolist()
        pairs = length // 4
        for i in range(pairs):
            w[r, slots[2 * i]], w[r, slots[2 * i + 1]] = 2.0 ** 60, -(2.0 ** 60)
        for i in slots[2 * pairs:]:
            w[r, i] = float(torch.randint(0, 9, (1,), generator=gen))
    return w


def sequential_sum(row):
    total = 0.0
    for v in row.tolist():
        total += v
    return total


@pytest.mark.parametrize("length", [2, 4, 8, 16, 32, 64])
def test_native_threshold_sums_the_window_in_the_reference_order(monkeypatch, length):
    """d exactly at tau = K * (window sum / L) does not switch, one float32 step above does: only the
    reference's summation order decides these rows the same way (the windows' sums are small integers, so
    tau is a float32 for L a power of two)."""
    rows = 96
    window = cancelling_windows(length, rows, seed=length)
    tau = window.double().sum(-1) / length  # the reference's order; K = 1
    at = tau.float()
    assert torch.equal(at.double(), tau) and (tau > 0).any()
    if length >= 8:  # the plain left-to-right order would decide some of these rows differently
        assert any(float(at[r]) > sequential_sum(window[r]) / length for r in range(rows))
    above = torch.nextafter(at, torch.full_like(at, math.inf))
    below = torch.nextafter(at, torch.full_like(at, -math.inf))
    s, t = logits(8, (rows, V))
    for d, switches in ((at, False), (above, True), (below, False)):
        states = {}
        for impl in ("torch", "native"):
            state = SwitchState.new(rows, length)
            state.window.copy_(window)
            state.count.fill_(length + 3)
            feed(monkeypatch, [d])
            fused_step(s, t, AdaSwitch(window=length, k=1.0), state, seed=0, keys=torch.arange(rows),
                       position=torch.zeros(rows, dtype=torch.long), eos_token_id=-1, pad_token_id=0, impl=impl)
            states[impl] = state
        assert_same_state(states["native"], states["torch"])
        assert bool((states["torch"].switched == switches).all())
