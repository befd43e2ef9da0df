"""fused_step semantics (docs/spec.md sections 2-4) on hand-made logits, on both backends: the AdaSwitch rule,
the equalities of section 6, greedy decoding, finished rows, batch invariance, no host sync, bad input."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adaswitch import reference
from adaswitch._backend import native_available, native_ops
from adaswitch.ops import SwitchState, fused_lookahead, fused_step
from adaswitch.policies import SKD, AdaSwitch, Mixed, Sampling, Student, Teacher

NO_NATIVE = not (native_available() and hasattr(native_ops(), "gumbel_argmax"))
NATIVE = pytest.param("native", marks=pytest.mark.skipif(NO_NATIVE, reason="adaswitch._C not built"))
IMPLS = ["torch", "triton", NATIVE]
V = 50
NEVER = -1  # eos_token_id for "no EOS": no row ever finishes


def run(policy, student, teacher, impl, *, keys=None, seed=0, eos=NEVER, pad=0, state=None):
    """Decode len(student or teacher) positions of B rows; returns tokens, from_teacher, divergence [B, N]."""
    seq = teacher if teacher is not None else student
    n, batch = seq.shape[:2]
    keys = torch.arange(batch) if keys is None else keys
    if state is None:
        state = SwitchState.new(batch, policy.window if isinstance(policy, AdaSwitch) else 1)
    outs = []
    for i in range(n):
        s = None if student is None else student[i]
        t = None if teacher is None else teacher[i]
        outs.append(fused_step(s, t, policy, state, seed=seed, keys=keys, position=torch.full((batch,), i),
                               eos_token_id=eos, pad_token_id=pad, impl=impl))
    stack = lambda name: torch.stack([getattr(o, name) for o in outs], 1)
    return stack("token"), stack("from_teacher"), stack("divergence"), state


# ------------------------------------------------------------------------------------ AdaSwitch rule

BASE, BUMP, SPIKE, HUGE = 1.0, 1.2, 1.5, 4.0  # teacher logit of token 0; student uniform
# forward KL(p_T || uniform) grows with the logit: d(BUMP) ~ 1.6 d(BASE), d(SPIKE) ~ 3 d(BASE),
# d(HUGE) ~ 70 d(BASE); so with K = 2 a BUMP never switches, a SPIKE after BASEs does.
ROWS = [
    {1: HUGE, 9: SPIKE},  # spike before eligibility is ignored (but joins the window); switch at 9
    {3: SPIKE, 6: HUGE},  # switch at the first eligible position (count == L == 3); later spikes ignored
    {2: SPIKE, 7: HUGE},  # too early at 2, switch at 7
    {4: BUMP},  # below K x mean: never
]
N = 12


def hand_logits():
    a = torch.full((N, len(ROWS)), BASE)
    for b, spikes in enumerate(ROWS):
        for i, value in spikes.items():
            a[i, b] = value
    teacher = torch.zeros(N, len(ROWS), V)
    teacher[:, :, 0] = a
    student = torch.randn(N, len(ROWS), V) * 0.01  # near-uniform student, distinct draws per row
    return student, teacher


def oracle(d, window, k, warmup, floor):
    """The switch position by docs/spec.md section 2, in plain Python."""
    hist = []
    for i, di in enumerate(d):
        if len(hist) >= max(window, warmup) and di > k * sum(hist[-window:]) / window and di >= floor:
            return i
        hist.append(di)
    return -1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("warmup, floor, expected", [
    (None, 0.0, [9, 3, 7, -1]),
    (5, 0.0, [9, 6, 7, -1]),  # row 1's spike at 3 is now too early; its HUGE at 6 switches
    (None, 0.1, [-1, 6, 7, -1]),  # d(SPIKE) < 0.1 <= d(HUGE): only HUGE spikes count
])
def test_adaswitch_switches_exactly_by_the_rule(impl, warmup, floor, expected):
    student, teacher = hand_logits()
    policy = AdaSwitch(window=3, k=2.0, warmup=warmup, min_divergence=floor)
    tokens, from_teacher, div, state = run(policy, student, teacher, impl)
    d_all = reference.divergence_rows(student, teacher, "forward_kl").T  # [B, N] float32
    assert [oracle(d_all[b].tolist(), 3, 2.0, warmup or 3, floor) for b in range(len(ROWS))] == expected
    assert state.switch_pos.tolist() == expected
    assert state.switched.tolist() == [e >= 0 for e in expected]
    s_tokens = run(Student(), student, None, "torch")[0]
    t_tokens = run(Teacher(), None, teacher, "torch")[0]
    for b, at in enumerate(expected):
        at = N if at < 0 else at
        assert not from_teacher[b, :at].any() and from_teacher[b, at:].all()  # at most once, never reverts
        assert torch.equal(tokens[b, :at], s_tokens[b, :at])
        assert torch.equal(tokens[b, at:], t_tokens[b, at:])
        assert torch.allclose(div[b, :at + 1], d_all[b, :at + 1], rtol=1e-5, atol=1e-6)  # incl. switch pos
        assert torch.isnan(div[b, at + 1:]).all()
        assert state.count[b] == at  # the window only grows before the switch
        last = d_all[b, max(0, at - 3):at]
        assert torch.allclose(state.window[b].sort().values, last.sort().values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_k_inf_is_the_student_policy(impl):
    student, teacher = torch.randn(2, 6, 3, V).unbind(0)
    sampling = Sampling(temperature=0.8, top_k=20)
    policy = AdaSwitch(window=2, k=math.inf, student_sampling=sampling)
    tok, ft, div, state = run(policy, student * 3, teacher, impl)
    assert torch.equal(tok, run(Student(sampling), student * 3, None, impl)[0])
    assert not ft.any() and not torch.isnan(div).any() and state.switch_pos.tolist() == [-1] * 3


@pytest.mark.parametrize("impl", IMPLS)
def test_skd_endpoints(impl):
    student, teacher = (torch.randn(2, 5, 3, V) * 2).unbind(0)
    ss, ts = Sampling(0.5, top_p=0.5), Sampling(0.2, top_p=0.5)  # the SKD paper's settings
    tok, ft, _, _ = run(SKD(top_k=V, student_sampling=ss, teacher_sampling=ts), student, teacher, impl)
    assert torch.equal(tok, run(Student(ss), student, None, impl)[0]) and not ft.any()
    tok, ft, _, _ = run(SKD(top_k=0, student_sampling=ss, teacher_sampling=ts), student, teacher, impl)
    assert torch.equal(tok, run(Teacher(ts), None, teacher, impl)[0]) and ft.all()


@pytest.mark.parametrize("impl", IMPLS)
def test_skd_keeps_drafts_in_the_teacher_top_k(impl):
    teacher = torch.arange(V, dtype=torch.float32).flip(0).expand(1, 4, V).clone()  # rank == token id
    teacher[0, :, 1] = teacher[0, :, 2] = 48.5  # a tie: id 1 ranks before id 2 (ranks 1 and 2)
    student = torch.full((1, 4, V), -math.inf)
    for row, draft in enumerate([0, 1, 2, 3]):
        student[0, row, draft] = 0.0  # the student can only draft `draft`
    tok, ft, _, _ = run(SKD(top_k=2), student, teacher, impl)
    assert ft[:, 0].tolist() == [False, False, True, True]
    assert tok[:2, 0].tolist() == [0, 1]


@pytest.mark.parametrize("impl", IMPLS)
def test_greedy_is_argmax_ties_to_lowest_id(impl):
    logits = torch.randint(0, 4, (1, 6, V)).float()  # many ties
    expected = torch.argmax(logits[0], -1)
    for policy, s, t in ((Student(Sampling(0)), logits, None), (Teacher(Sampling(0)), None, logits),
                         (Mixed(0.5, Sampling(0)), logits, None)):
        assert torch.equal(run(policy, s, t, impl)[0][:, 0], expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_finished_rows_emit_pad_and_keep_state(impl):
    student, teacher = torch.randn(2, 3, V).unbind(0)
    policy = AdaSwitch(window=2, k=math.inf)
    state = SwitchState.new(3, 2)
    state.finished[1] = True
    state.window[1] = torch.tensor([0.5, 0.25])
    state.count[1] = 5
    out = fused_step(student, teacher, policy, state, seed=0, keys=torch.arange(3), position=torch.zeros(3,
                     dtype=torch.long), eos_token_id=NEVER, pad_token_id=7, impl=impl)
    assert out.token[1] == 7 and not out.from_teacher[1] and torch.isnan(out.divergence[1])
    assert state.window[1].tolist() == [0.5, 0.25] and state.count[1] == 5 and state.finished[1]
    assert state.count[0] == 1 and state.count[2] == 1


@pytest.mark.parametrize("impl", IMPLS)
def test_eos_finishes_the_row(impl):
    """Where each row can only draw EOS is fixed by the logits (no chance involved): a row ends at its EOS
    and emits pad after it, whatever its later logits allow; a row that never draws EOS runs to the end."""
    student = torch.full((5, 3, V), -math.inf)
    student[:, :, 9] = 0.0  # every row can draw 9 ...
    student[0, 0, 9] = -math.inf
    student[0, 0, 5] = 0.0  # ... row 0 only EOS (5) at position 0
    student[2, 1, 9] = -math.inf
    student[2, 1, 5] = 0.0  # row 1 only EOS at position 2
    student[3:, :2, 5] = 0.0  # after their EOS rows 0 and 1 could draw 5 or 9: they must emit pad
    tok, _, _, state = run(Student(), student, None, impl, eos=5, pad=0)
    assert tok[0].tolist() == [5, 0, 0, 0, 0]
    assert tok[1].tolist() == [9, 9, 5, 0, 0]
    assert tok[2].tolist() == [9, 9, 9, 9, 9]  # no EOS drawn: never finished
    assert state.finished.tolist() == [True, True, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_invariance(impl):
    student, teacher = (torch.randn(2, 6, 5, V) * 2).unbind(0)
    keys = torch.tensor([11, 3, 42, 7, 100])
    policy = AdaSwitch(window=2, k=1.2)
    full = run(policy, student, teacher, impl, keys=keys, seed=9)
    rows = torch.tensor([3, 0])
    part = run(policy, student[:, rows], teacher[:, rows], impl, keys=keys[rows], seed=9)
    for a, b in zip(full[:3], part[:3]):
        assert torch.allclose(a[rows].float(), b.float(), equal_nan=True, rtol=1e-6)
    assert torch.equal(full[3].switch_pos[rows], part[3].switch_pos)


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that read a device value on the host."""

    SYNC_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["torch", NATIVE])
@pytest.mark.parametrize("policy", [Student(Sampling(top_p=0.9)), Teacher(Sampling(0.7, top_k=5)), Mixed(),
                                    SKD(top_k=3), AdaSwitch(window=2, divergence="jsd")],
                         ids=lambda p: type(p).__name__)
def test_no_host_sync(policy, impl):
    student, teacher = torch.randn(2, 4, V).unbind(0)
    state = SwitchState.new(4, getattr(policy, "window", 1))
    keys, position = torch.arange(4), torch.zeros(4, dtype=torch.long)
    with SyncCounter() as counter:
        for _ in range(3):
            fused_step(student, teacher, policy, state, seed=1, keys=keys, position=position,
                       eos_token_id=3, pad_token_id=0, impl=impl)
            position = position + 1
        fused_lookahead(student[:, None].expand(4, 2, V), teacher[:, None].expand(4, 2, V),
                        torch.zeros(4, 2, dtype=torch.long), policy, state, seed=1, keys=keys,
                        position=position, eos_token_id=3, pad_token_id=0, impl=impl)
    assert counter.count == 0


def test_bad_input():
    s, t = torch.randn(2, 3, V).unbind(0)
    keys, pos = torch.arange(3), torch.zeros(3, dtype=torch.long)
    state = SwitchState.new(3, 4)
    ok = dict(seed=0, keys=keys, position=pos, eos_token_id=1, pad_token_id=0)

    def call(student=s, teacher=t, policy=None, st=state, **kw):
        return fused_step(student, teacher, policy or AdaSwitch(window=4), st, **{**ok, **kw})

    cases = [
        (ValueError, "teacher_logits are required", dict(teacher=None)),
        (ValueError, "student_logits are required", dict(student=None, policy=SKD())),
        (ValueError, "vocabulary size", dict(teacher=torch.randn(3, V + 1))),
        (ValueError, "shape", dict(teacher=torch.randn(2, V))),
        (TypeError, "float16", dict(student=torch.zeros(3, V, dtype=torch.long))),
        (TypeError, "int64", dict(keys=keys.int())),
        (ValueError, "position must have shape", dict(position=torch.zeros(4, dtype=torch.long))),
        (ValueError, "policy.window", dict(policy=AdaSwitch(window=3))),
        (ValueError, "state must hold", dict(st=SwitchState.new(2, 4))),
        (TypeError, "policy", dict(policy="adaswitch")),
        (TypeError, "state", dict(st=None)),
        (TypeError, "seed", dict(seed=0.5)),
        (TypeError, "eos_token_id", dict(eos_token_id=None)),
        (ValueError, rf"eos_token_id must be a token id in \[0, {V}\)", dict(eos_token_id=V)),
        (ValueError, rf"eos_token_id must be a token id in \[0, {V}\)", dict(eos_token_id=-2)),
        (ValueError, rf"pad_token_id must be a token id in \[0, {V}\)", dict(pad_token_id=-1)),
        (ValueError, "impl", dict(impl="cuda")),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            call(**kw)
    with pytest.raises(ValueError, match="window"):
        SwitchState.new(3, 0)
    with pytest.raises(ValueError, match="draft"):
        fused_lookahead(s[:, None], t[:, None], torch.zeros(3, 2, dtype=torch.long), AdaSwitch(window=4),
                        state, **ok)
    with pytest.raises(ValueError, match=r"\[B, G, V\]"):
        fused_lookahead(s, t, torch.zeros(3, 1, dtype=torch.long), AdaSwitch(window=4), state, **ok)


@pytest.mark.skipif(NO_NATIVE, reason="adaswitch._C not built")
def test_native_logit_rank():
    from adaswitch.ops.step import _teacher_rank

    logits = torch.randint(0, 5, (64, 37)).float()  # many ties
    logits[:, 3] = -math.inf
    token = torch.randint(0, 37, (64,))
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        assert torch.equal(native_ops().logit_rank(x, token), _teacher_rank(x, token))
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        native_ops().logit_rank(logits, torch.full((64,), 37))
