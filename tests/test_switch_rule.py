"""The AdaSwitch switching rule on crafted divergence sequences, identical on every implementation (PyTorch
reference, native CPU path, Triton interpreter) and in lookahead mode: the absolute trigger
(max_divergence), infinite and NaN divergences, and the scheduled controls FixedSwitch / RandomSwitch."""

import math

import pytest
import torch

from adaswitch._backend import native_available, native_ops
from adaswitch.ops import SwitchState, fused_lookahead, fused_step, rng
from adaswitch.policies import NEVER, AdaSwitch, FixedSwitch, RandomSwitch

EOS, PAD = 15, 14
V = 16
NO_NATIVE = not (native_available() and hasattr(native_ops(), "gumbel_argmax"))
IMPLS = ["torch", "triton", pytest.param("native", marks=pytest.mark.skipif(NO_NATIVE, reason="no adaswitch._C"))]


def sequence(kinds, seed=0):
    """Student / teacher logits [n, B, V] from per-row strings of position kinds: '.' calm (d ~ 0.005),
    's' spike (d ~ 2), 'L' lost (d ~ 1), 'i' +inf forward KL (the student masks the teacher's top token
    with -inf), 'n' NaN (a NaN student logit). EOS is never likely."""
    gen = torch.Generator().manual_seed(seed)
    n, b = len(kinds[0]), len(kinds)
    t = torch.randn(n, b, V, generator=gen)
    t[..., EOS] = -20.0
    noise = torch.randn(n, b, V, generator=gen)
    s = t + 0.1 * noise
    for r, row in enumerate(kinds):
        for i, c in enumerate(row):
            if c == "s":
                s[i, r] = t[i, r] + 3.0 * noise[i, r]
            elif c == "L":
                s[i, r] = t[i, r] + 1.5 * noise[i, r]
            elif c == "i":
                s[i, r, int(t[i, r].argmax())] = -math.inf
            elif c == "n":
                s[i, r, 3] = math.nan
            s[i, r, EOS] = -20.0
    return s, t


def steps(policy, s, t, impl, seed=3):
    """Step mode over every position: (state, [StepOutput])."""
    n, b, _ = s.shape
    state = SwitchState.new(b, policy.window)
    keys = torch.arange(b) + 40
    outs = [fused_step(s[i], t[i], policy, state, seed=seed, keys=keys, position=torch.full((b,), i),
                       eos_token_id=EOS, pad_token_id=PAD, impl=impl) for i in range(n)]
    return state, outs


def lookahead(policy, s, t, impl, seed=3):
    """One fused_lookahead over all n positions (drafts: token 0, never EOS)."""
    n, b, _ = s.shape
    state = SwitchState.new(b, policy.window)
    keys = torch.arange(b) + 40
    draft = torch.zeros(b, n, dtype=torch.long)
    out = fused_lookahead(s.transpose(0, 1), t.transpose(0, 1), draft, policy, state, seed=seed, keys=keys,
                          position=torch.zeros(b, dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD,
                          impl=impl)
    return state, out


def check_everywhere(policy, kinds, expected_switch):
    """Every implementation, step and lookahead mode: the same switch positions (expected_switch), the same
    state, a window holding finite values only; returns the reference state and step outputs."""
    s, t = sequence(kinds)
    ref_state, ref_outs = steps(policy, s, t, "torch")
    assert ref_state.switch_pos.tolist() == expected_switch
    assert torch.isfinite(ref_state.window).all()
    for impl in ("torch", "triton", *(() if NO_NATIVE else ("native",))):
        for mode in (steps, lookahead):
            state, out = mode(policy, s, t, impl)
            for name in ("count", "switched", "switch_pos"):
                assert torch.equal(getattr(state, name), getattr(ref_state, name)), (impl, mode.__name__, name)
            torch.testing.assert_close(state.window, ref_state.window, rtol=1e-5, atol=1e-6)
            if mode is lookahead:
                n = s.shape[0]
                want = torch.where(ref_state.switch_pos >= 0, ref_state.switch_pos, n)
                assert torch.equal(out.accepted, want), (impl, out.accepted, want)
                assert torch.equal(out.from_teacher, ref_state.switch_pos >= 0)
            else:
                for i, (a, b) in enumerate(zip(out, ref_outs)):
                    assert torch.equal(a.from_teacher, b.from_teacher)
                    drawn = b.from_teacher | ~s[i].isnan().any(-1)  # a draw from NaN logits is undefined
                    assert torch.equal(a.token[drawn], b.token[drawn])
                    torch.testing.assert_close(a.divergence, b.divergence, equal_nan=True, rtol=1e-5, atol=1e-6)
    return ref_state, ref_outs


# ------------------------------------------------------------------------------------- +inf and NaN

def test_infinite_divergence_switches_at_once_even_in_the_warmup():
    """+inf (a student-only -inf mask under forward KL) is a spike above every level: the row switches
    there, and +inf never enters the window (where it would silence every later spike for L positions)."""
    kinds = ["..i.....s...",   # +inf inside the warm-up (L = 4): switches at 2, not at the later spike
             "......i.....",   # +inf after the warm-up
             "........s..."]   # control: the ordinary relative spike
    state, outs = check_everywhere(AdaSwitch(window=4, k=3.0), kinds, [2, 6, 8])
    assert outs[2].divergence[0] == math.inf  # reported at the switch position
    assert state.count.tolist() == [2, 6, 8]


def test_infinite_divergence_switches_with_an_infinite_k():
    """k = inf turns the relative trigger off; an infinite divergence still switches."""
    check_everywhere(AdaSwitch(window=2, k=math.inf), ["...i....", "........"], [3, -1])


def test_nan_divergence_is_skipped():
    """NaN carries no information: no switch, not pushed, not counted toward the warm-up; the next spike is
    still seen (a NaN in the window made the threshold NaN: no switch for L positions)."""
    kinds = ["......ns....",   # NaN after the warm-up, spike right after it: switches at 7
             ".n..s..s....",   # NaN in the warm-up: at position 4 the row holds 3 divergences (< L), no
                               # switch; the spike at 7 switches
             "nnnnnnnnnnnn"]   # only NaN: never switches, nothing pushed
    state, outs = check_everywhere(AdaSwitch(window=4, k=3.0), kinds, [7, 7, -1])
    assert state.count.tolist() == [6, 6, 0]
    assert math.isnan(outs[6].divergence[0]) and not outs[6].from_teacher[0]


# ------------------------------------------------------------------------------------ absolute trigger

def test_absolute_trigger_switches_a_lost_student():
    """A student that is far from the teacher from the first token on never spikes relative to its own
    mean; max_divergence switches it at its first exploration position above the level."""
    lost = ["LLLLLLLLLLLL", "............"]
    s, t = sequence(lost)
    d = torch.stack([o.divergence for o in steps(AdaSwitch(window=4, k=5.0), s, t, "torch")[1]])
    assert (d[:, 0] > 0.3).all() and (d[:, 1] < 0.05).all()
    check_everywhere(AdaSwitch(window=4, k=5.0), lost, [-1, -1])  # relative rule alone: never
    level = float(d[:, 0].min()) + 1e-3  # just above the lost row's smallest divergence
    first = int((d[:, 0] > level).nonzero()[0])
    check_everywhere(AdaSwitch(window=4, k=5.0, max_divergence=level), lost, [first, -1])
    check_everywhere(AdaSwitch(window=4, k=5.0, max_divergence=0.3), lost, [0, -1])  # warm-up included


def test_absolute_trigger_is_strictly_above():
    s, t = sequence(["LLLL"])
    d0 = float(steps(AdaSwitch(window=4), s, t, "torch")[1][0].divergence[0])
    at = AdaSwitch(window=4, k=5.0, max_divergence=d0)
    state, _ = steps(at, s, t, "torch")
    assert state.switch_pos[0] != 0
    assert steps(AdaSwitch(window=4, k=5.0, max_divergence=math.nextafter(d0, 0) * 0.999), s, t,
                 "torch")[0].switch_pos[0] == 0


def test_max_divergence_validation():
    for bad in (-1.0, math.nan, "1", True):
        with pytest.raises(ValueError, match="max_divergence"):
            AdaSwitch(max_divergence=bad)
    assert AdaSwitch().max_divergence == math.inf and AdaSwitch(max_divergence=0).max_divergence == 0


# ------------------------------------------------------------------------------------------- controls

def test_fixed_switch_ignores_the_divergence():
    """The student writes exactly the warm-up max(L, W); spikes, +inf and NaN change nothing."""
    kinds = [".s.i.s.s....", "nnnnnnnnnnnn", "............"]
    state, outs = check_everywhere(FixedSwitch(window=4, warmup=6), kinds, [6, 6, 6])
    assert all(not o.from_teacher.any() for o in outs[:6]) and all(o.from_teacher.all() for o in outs[6:])
    assert FixedSwitch(window=4).switch_position == 4
    check_everywhere(FixedSwitch(window=4, position=2), kinds, [2, 2, 2])
    check_everywhere(FixedSwitch(window=4, position=0), kinds, [0, 0, 0])


def test_random_switch_rows_switch_at_their_draw():
    policy = RandomSwitch(window=4, positions=(1, 5, -1, 9))
    b = 8
    at = policy.switch_at(3, torch.arange(b) + 40)
    assert set(at.tolist()) <= {1, 5, 9, NEVER} and len(set(at.tolist())) >= 3
    want = [p if p != NEVER else -1 for p in at.tolist()]
    check_everywhere(policy, [".s.i.n.s...."] * b, want)


def test_random_switch_draw_is_reproducible_batch_invariant_and_weighted():
    policy = RandomSwitch(positions=(3, 8, -1, 12), weights=(1.0, 2.0, 1.0, 0.0))
    keys = torch.arange(40000)
    at = policy.switch_at(11, keys)
    assert torch.equal(at, policy.switch_at(11, keys))
    assert torch.equal(at[123:130], policy.switch_at(11, keys[123:130]))  # a row's draw ignores its batch
    assert not torch.equal(at, policy.switch_at(12, keys))  # the seed matters
    freq = [(at == p).float().mean().item() for p in (3, 8, NEVER, 12)]
    assert freq[3] == 0.0
    for f, want in zip(freq, (0.25, 0.5, 0.25)):
        assert abs(f - want) < 0.01
    u = rng.switch_draw(11, keys)
    assert ((u > 0) & (u < 1)).all() and not torch.equal(u, rng.mixed_coin(11, keys, 0.5).float())


def test_control_validation():
    with pytest.raises(ValueError, match="position"):
        FixedSwitch(position=-1)
    with pytest.raises(ValueError, match="positions"):
        RandomSwitch(positions=())
    with pytest.raises(ValueError, match="positions"):
        RandomSwitch(positions=(3, -2))
    with pytest.raises(ValueError, match="weights"):
        RandomSwitch(positions=(3, 4), weights=(1.0,))
    with pytest.raises(ValueError, match="weights"):
        RandomSwitch(positions=(3, 4), weights=(0.0, 0.0))
    with pytest.raises(ValueError, match="window"):
        FixedSwitch(window=0)
    assert isinstance(RandomSwitch(), AdaSwitch) and RandomSwitch().code == AdaSwitch.code


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["jsd", "skew_forward_kl", "skew_reverse_kl", "forward_kl", "reverse_kl"])
def test_equal_distributions_never_give_a_negative_divergence(impl, kind):
    """The rule's divergence is >= 0 as token_divergence's: rounding of equal inputs gave about -1e-7 for jsd
    and the skew KLs, below a floor F = 0 where a KL is never below it. Step and lookahead mode; NaN still
    passes through as NaN."""
    gen = torch.Generator().manual_seed(5)
    n, b = 3, 16  # jsd: about half of such equal rows round below 0 without the clamp
    t = torch.randn(n, b, V, generator=gen) * 4
    t[..., EOS] = -20.0
    policy = AdaSwitch(window=2, k=1.5, warmup=8, min_divergence=0.0, divergence=kind)  # no switch in 3 steps
    _, outs = steps(policy, t.clone(), t, impl)
    d = torch.stack([o.divergence for o in outs])
    assert torch.isfinite(d).all() and (d >= 0).all(), d.min()
    _, out = lookahead(policy, t.clone(), t, impl)
    assert torch.isfinite(out.divergence).all() and (out.divergence >= 0).all(), out.divergence.min()
    s = t.clone()
    s[0, 0, 3] = math.nan
    _, outs = steps(policy, s, t, impl)
    assert math.isnan(outs[0].divergence[0].item()) and (outs[0].divergence[1:] >= 0).all()
