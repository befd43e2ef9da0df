"""Speculative teacher guidance (adaswitch.ops.fused_speculative, generate(guidance="speculative")) and the
teacher states generate returns for the loss (return_teacher_states).

- the op: Triton == native == PyTorch reference on every decision, the bonus token included; a chi-square
  test over many counter-based draws on a tiny vocabulary that every guided token follows the teacher's
  sampling distribution (with temperature, top_k, top_p, greedy), at the first guided index, later ones and
  the bonus index G;
- generate: greedy teachers give exactly step mode's tokens (AdaSwitch, its controls, Teacher), with
  bonus tokens taken; sampled runs keep the invariants (batch invariance, backend equality, host-read bound,
  EOS);
- teacher states: equal to the states of a full teacher forward over prompt + response, where the teacher ran
  (bonus positions included).
"""

import math

import pytest
import torch
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE, random_prompts

import adaswitch.engine.generate as engine
from adaswitch import SKD, AdaSwitch, FixedSwitch, Sampling, Student, Teacher, generate, native_available
from adaswitch.engine.sync import SyncCounter
from adaswitch.ops import fused_speculative, rng
from adaswitch.ops.speculative import sampling_probs

pytestmark = pytest.mark.usefixtures("one_thread")
# the fixtures teacher, student and prompts (B prompts of up to P tokens): tests/conftest.py

N, B, P = 14, 4, 6
SWITCHY = AdaSwitch(window=3, k=1.1)
IMPLS = ["torch", "triton"] + (["native"] if native_available() else [])


@pytest.fixture
def spec_calls(monkeypatch):
    """The SpeculativeOutput of every guided block generate runs (to check that bonuses occur)."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(fused_speculative(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(engine, "fused_speculative", spy)
    return calls


def _count(calls, field) -> int:
    return sum(int(getattr(c, field).sum()) for c in calls)


def run(student, teacher, prompts, policy, **kw):
    ids, mask = prompts
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("vocab_size", VOCAB_SIZE)  # the teacher alone (step-mode Teacher) would see its padded rows
    kw.setdefault("lookahead", 0)  # step mode unless a test asks for blocks (or "auto")
    kw.update(policy=policy, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return generate(student, teacher, ids, mask, **kw)


def _spec(s, t, draft, start, ss, ts, keys, pos, impl, seed=3, eos=10**6):
    return fused_speculative(s, t, draft, start, student_sampling=ss, teacher_sampling=ts, seed=seed, keys=keys,
                             position=pos, eos_token_id=eos, pad_token_id=0, impl=impl)


def _drafts(s, ss, keys, pos, seed=3):
    g = s.shape[1]
    return torch.stack([rng.sample(s[:, j], ss, seed=seed, keys=keys, positions=pos + j, stream=0)
                        for j in range(g)], 1)


SAMPLINGS = [
    (Sampling(), Sampling()),
    (Sampling(0.7, top_k=4), Sampling(1.4, top_p=0.8)),
    (Sampling(1.2, top_p=0.7), Sampling(0.6, top_k=3)),
    (Sampling(0.0), Sampling(0.8)),
    (Sampling(0.9), Sampling(0.0)),
]


# ------------------------------------------------------------------------------------------------ the op

FIELDS = ("accepted", "token", "resampled", "bonus", "finished")


@pytest.mark.parametrize("bonus", [False, True], ids=["G", "G+1"])
@pytest.mark.parametrize("ss,ts", SAMPLINGS)
def test_backends_agree_on_every_decision(ss, ts, bonus):
    torch.manual_seed(1)
    b, g, v = 24, 4, 37
    s = torch.randn(b, g, v) * 2
    t = torch.cat([s, s[:, -1:]], 1) + torch.randn(b, g + 1, v)  # related models: some drafts accepted
    t = t if bonus else t[:, :g]  # G + 1 positions: the teacher also scored the bonus position
    keys, pos = torch.arange(b) * 7 + 3, torch.randint(0, 30, (b,))
    draft = _drafts(s, ss, keys, pos)
    draft[0, 1] = v + 5  # an id outside the vocabulary: rejected everywhere
    start = torch.randint(0, g + 1, (b,))
    start[0] = 0
    eos = int(draft[1, 2])  # some rows meet an EOS draft
    ref = _spec(s, t, draft, start, ss, ts, keys, pos, "torch", eos=eos)
    assert ref.resampled.any() and (ref.accepted > 0).any()
    assert bool(ref.bonus.any()) == bonus  # bonus cases present exactly when the teacher scored index G
    for impl in IMPLS[1:]:
        out = _spec(s, t, draft, start, ss, ts, keys, pos, impl, eos=eos)
        for field in FIELDS:
            assert torch.equal(getattr(out, field), getattr(ref, field)), (impl, field)
    # rows with start >= G take nothing
    idle = start >= g
    assert not ref.resampled[idle].any() and not ref.accepted[idle].any() and not ref.bonus[idle].any()
    assert (ref.token[idle] == 0).all()
    # a bonus row accepted every draft from its start, without EOS; a resampled row takes no bonus
    assert (ref.accepted[ref.bonus] == g - start[ref.bonus]).all() and not (ref.bonus & ref.resampled).any()
    # the bonus only adds to the G-position decisions
    if bonus:
        plain = _spec(s, t[:, :g], draft, start, ss, ts, keys, pos, "torch", eos=eos)
        for field in ("accepted", "resampled"):
            assert torch.equal(getattr(plain, field), getattr(ref, field)), field
        assert torch.equal(plain.token[~ref.bonus], ref.token[~ref.bonus])
    # bf16 logits run on every backend too
    for impl in IMPLS:
        _spec(s.bfloat16(), t.bfloat16(), draft, start, ss, ts, keys, pos, impl)


def test_a_bonus_eos_finishes_the_row():
    """A row whose bonus token is EOS is finished, on every backend; the other bonus rows are not."""
    torch.manual_seed(2)
    b, g, v = 16, 2, 11
    s = torch.randn(b, g, v)
    t = torch.cat([s, s[:, -1:]], 1) + 0.2 * torch.randn(b, g + 1, v)
    keys, pos = torch.arange(b), torch.zeros(b, dtype=torch.long)
    ss = ts = Sampling()
    draft, start = _drafts(s, ss, keys, pos), torch.zeros(b, dtype=torch.long)
    first = _spec(s, t, draft, start, ss, ts, keys, pos, "torch", eos=v + 1)
    assert first.bonus.sum() >= 2 and not first.finished.any()
    row = int(first.bonus.nonzero()[0])
    eos = int(first.token[row])
    for impl in IMPLS:
        out = _spec(s, t, draft, start, ss, ts, keys, pos, impl, eos=eos)
        assert bool(out.bonus[row]) and bool(out.finished[row]), impl
        assert torch.equal(out.finished & out.bonus, out.bonus & (out.token == eos)), impl


def test_teacher_logits_shape_is_checked():
    s, draft = torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    keys = pos = start = torch.zeros(2, dtype=torch.long)
    for bad in (torch.zeros(2, 2, 5), torch.zeros(2, 5, 5), torch.zeros(2, 4, 6)):
        with pytest.raises(ValueError, match=r"teacher_logits must be \[B, G, V\] or \[B, G \+ 1, V\]"):
            _spec(s, bad, draft, start, Sampling(), Sampling(), keys, pos, "torch")


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    total = counts.sum().item()
    expected = probs.double() * total
    support = expected > 0
    assert counts[~support].sum() == 0, "a token outside the teacher's support was emitted"
    stat = (((counts[support].double() - expected[support]) ** 2) / expected[support]).sum().item()
    return stat, int(support.sum()) - 1


# chi-square critical values at p = 1e-4 for 1..8 degrees of freedom
_CRIT = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88, 8: 31.83}


def _assert_follows(tokens: torch.Tensor, probs: torch.Tensor, *context) -> None:
    """`tokens` pass the chi-square test against `probs`; a point mass (greedy): every token is its argmax."""
    counts = torch.bincount(tokens, minlength=len(probs))
    stat, dof = _chi_square(counts, probs)
    if dof == 0:
        assert counts[probs > 0].sum() == len(tokens)
    else:
        assert stat < _CRIT[dof], (*context, stat, dof, counts.tolist(), probs.tolist())


V, G, DRAWS = 7, 3, 20000  # the chi-square tests: vocabulary, drafted positions, independent keys


def _chi_square_rows(teacher_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits the chi-square tests draw from: the student's [G, V] and the teacher's [teacher_rows, V]."""
    gen = torch.Generator().manual_seed(4)
    return torch.randn(G, V, generator=gen) * 1.5, torch.randn(teacher_rows, V, generator=gen) * 1.5


def _draws(s_row, t_row, ss, ts, index, draws, impl):
    """The op over `draws` independent keys (start = index), every row with the same logits (the student's
    `s_row` [G, V], the teacher's `t_row` [G, V] or [G + 1, V]), so each key is one independent draw:
    the drafts, the op's output and the keys."""
    keys = torch.arange(draws) + 1000
    pos = torch.full((draws,), 11)
    s = s_row[None].expand(draws, -1, -1).contiguous()
    t = t_row[None].expand(draws, -1, -1).contiguous()
    draft = _drafts(s, ss, keys, pos)
    return draft, _spec(s, t, draft, torch.full((draws,), index), ss, ts, keys, pos, impl), keys


def _guided_tokens(s_row, t_row, ss, ts, index, draws, impl):
    """Tokens the op writes at guided index `index` (start = index) over `draws` independent keys; the
    logits of every row are the same [G, V] (so each key is one independent draw)."""
    g = s_row.shape[0]
    draft, out, _ = _draws(s_row, t_row, ss, ts, index, draws, impl)
    first = torch.where(out.accepted > 0, draft[:, index], out.token)
    # the token at index + 1 exists where the first was accepted (a later guided position)
    second_ok = (out.accepted > 0) & (index + 1 < g)
    second = torch.where(out.accepted > 1, draft[:, min(index + 1, g - 1)], out.token)
    return first, second[second_ok]


@pytest.mark.parametrize("ss,ts", SAMPLINGS, ids=["plain", "topk-topp", "topp-topk", "greedy-student",
                                                  "greedy-teacher"])
def test_guided_tokens_follow_the_teacher_distribution(ss, ts):
    s_row, t_row = _chi_square_rows(G)
    first, second = _guided_tokens(s_row, t_row, ss, ts, 1, DRAWS, "torch")
    for tokens, j in ((first, 1), (second, 2)):
        _assert_follows(tokens, sampling_probs(t_row[j][None], ts)[0], j)


def test_chi_square_catches_a_wrong_distribution():
    """The check above fails when the op is broken: guided tokens taken as the student's drafts (no
    rejection) do not follow the teacher."""
    s_row, t_row = _chi_square_rows(G)
    ss = ts = Sampling()
    keys, pos = torch.arange(DRAWS) + 1000, torch.full((DRAWS,), 11)
    draft = _drafts(s_row[None].expand(DRAWS, G, -1), ss, keys, pos)
    stat, dof = _chi_square(torch.bincount(draft[:, 1], minlength=V), sampling_probs(t_row[1][None], ts)[0])
    assert stat > _CRIT[dof]


def _bonus_tokens(s_row, t_row, ss, ts, index, draws, impl):
    """The bonus tokens the op writes over `draws` independent keys (start = index; the teacher's logits
    [G + 1, V] include the bonus position), and their keys."""
    g = s_row.shape[0]
    _, out, keys = _draws(s_row, t_row, ss, ts, index, draws, impl)
    assert (out.accepted[out.bonus] == g - index).all()
    return out.token[out.bonus], keys[out.bonus]


@pytest.mark.parametrize("ss,ts", SAMPLINGS, ids=["plain", "topk-topp", "topp-topk", "greedy-student",
                                                  "greedy-teacher"])
def test_bonus_tokens_follow_the_teacher_distribution(ss, ts):
    """Given that every draft was accepted, the bonus token at index G is a draw from p_T there."""
    s_row, t_row = _chi_square_rows(G + 1)
    tokens, _ = _bonus_tokens(s_row, t_row, ss, ts, 1, DRAWS, "torch")
    assert len(tokens) > 200, len(tokens)
    _assert_follows(tokens, sampling_probs(t_row[G][None], ts)[0])


def test_chi_square_catches_a_wrong_bonus():
    """The bonus check fails for a bonus drawn from the wrong distribution: the student's p_S at the last
    drafted index, or the teacher's p_T one index early, with the bonus's own noise."""
    s_row, t_row = _chi_square_rows(G + 1)
    ss = ts = Sampling()
    tokens, keys = _bonus_tokens(s_row, t_row, ss, ts, 1, DRAWS, "torch")
    noise = rng.gumbel(3, keys, torch.full_like(keys, 11 + G), rng.STREAM_RESIDUAL, V)
    probs = sampling_probs(t_row[G][None], ts)[0]
    for wrong in (sampling_probs(s_row[G - 1][None], ss), sampling_probs(t_row[G - 1][None], ts)):
        bad = torch.argmax(torch.log(wrong) + noise, -1)
        stat, dof = _chi_square(torch.bincount(bad, minlength=V), probs)
        assert stat > _CRIT[dof]
    # the op's own bonus tokens are exactly that rule at index G
    assert torch.equal(tokens, torch.argmax(torch.log(probs)[None] + noise, -1))


def test_triton_matches_reference_on_the_chi_square_draws():
    v, g, draws = 7, 3, 120
    gen = torch.Generator().manual_seed(4)
    s_row, t_row = torch.randn(g, v, generator=gen), torch.randn(g, v, generator=gen)
    ss, ts = Sampling(0.8, top_k=5), Sampling(1.3, top_p=0.85)
    ref = _guided_tokens(s_row, t_row, ss, ts, 0, draws, "torch")
    t_bonus = torch.cat([t_row, torch.randn(1, v, generator=gen)])
    ref_bonus = _bonus_tokens(s_row, t_bonus, ss, ts, 1, draws, "torch")
    assert len(ref_bonus[0]) > 10
    for impl in IMPLS[1:]:
        out = _guided_tokens(s_row, t_row, ss, ts, 0, draws, impl)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1]), impl
        out_bonus = _bonus_tokens(s_row, t_bonus, ss, ts, 1, draws, impl)
        assert torch.equal(out_bonus[0], ref_bonus[0]) and torch.equal(out_bonus[1], ref_bonus[1]), impl


# ------------------------------------------------------------------------------------------------- engine

GREEDY_T = [
    AdaSwitch(window=3, k=1.1, teacher_sampling=Sampling(0.0)),
    AdaSwitch(window=2, k=1.05, student_sampling=Sampling(0.7, top_p=0.9), teacher_sampling=Sampling(0.0)),
    Teacher(sampling=Sampling(0.0)),
]


@pytest.mark.parametrize("policy", GREEDY_T, ids=["adaswitch", "adaswitch-topp-student", "teacher"])
@pytest.mark.parametrize("g", [1, 3, 5])
def test_greedy_teacher_gives_step_mode_tokens(student, teacher, prompts, policy, g):
    step = run(student, teacher, prompts, policy)
    guided = run(student, teacher, prompts, policy, lookahead=g, guidance="speculative", sync_every=3)
    assert torch.equal(step.response, guided.response)
    assert torch.equal(step.from_teacher, guided.from_teacher)
    assert torch.equal(step.lengths, guided.lengths)
    assert torch.equal(step.switch_position, guided.switch_position)
    torch.testing.assert_close(step.divergence, guided.divergence, equal_nan=True, atol=1e-5, rtol=1e-4)
    if isinstance(policy, AdaSwitch):
        assert (guided.switch_position >= 0).any()


GREEDY_BOTH = [
    AdaSwitch(window=2, k=1.05, student_sampling=Sampling(0.0), teacher_sampling=Sampling(0.0)),
    FixedSwitch(position=3, student_sampling=Sampling(0.0), teacher_sampling=Sampling(0.0)),
]


@pytest.mark.parametrize("policy", GREEDY_BOTH, ids=["adaswitch", "fixed-switch"])
@pytest.mark.parametrize("g", [1, 3])
def test_greedy_teacher_gives_step_mode_tokens_with_bonuses(near_teacher, teacher, prompts, policy, g, spec_calls):
    """A student close to the teacher: blocks accept every draft and take the bonus token (G + 1 teacher
    tokens for one teacher forward), others reject; the tokens are still exactly step mode's, bonuses past
    max_new_tokens included (blocks of G + 1 cross N)."""
    step = run(near_teacher, teacher, prompts, policy)
    guided = run(near_teacher, teacher, prompts, policy, lookahead=g, guidance="speculative", sync_every=3)
    for field in ("response", "from_teacher", "lengths", "switch_position"):
        assert torch.equal(getattr(step, field), getattr(guided, field)), field
    torch.testing.assert_close(step.divergence, guided.divergence, equal_nan=True, atol=1e-5, rtol=1e-4)
    assert _count(spec_calls, "bonus") > 0 and _count(spec_calls, "resampled") > 0
    assert (guided.switch_position >= 0).any() and (guided.lengths < N).any()  # an EOS row too
    # fewer teacher forwards (blocks) than the teacher tokens the blocks wrote
    assert len(spec_calls) < int(guided.from_teacher.sum())


def test_guided_blocks_score_every_draft_like_a_full_forward(near_teacher, teacher, prompts, monkeypatch):
    """The logits each guided block feeds fused_speculative are those of a full forward of each model over the
    row's unpadded prompt + response so far + the block's earlier drafts (no cache): both caches are right
    after blocks that took a bonus token or rolled back. A wrong student cache would not change a greedy
    teacher's tokens (every token after the switch is the teacher's), only how many drafts are accepted."""
    calls = []

    def spy(student_logits, teacher_logits, draft, stops, **kwargs):
        calls.append((student_logits.clone(), teacher_logits.clone(), draft.clone(), kwargs["position"].clone()))
        return fused_speculative(student_logits, teacher_logits, draft, stops, **kwargs)

    monkeypatch.setattr(engine, "fused_speculative", spy)
    ids, mask = prompts
    out = run(near_teacher, teacher, prompts, GREEDY_BOTH[0], lookahead=3, guidance="speculative", sync_every=3)
    assert len(calls) > 2 and (out.switch_position >= 0).any()
    checked = 0
    for student_logits, teacher_logits, draft, position in calls:
        for r in range(B):
            pos = int(position[r])
            if pos >= int(out.lengths[r]):  # finished rows run along with the batch
                continue
            prefix = ids[r][mask[r].bool()].tolist() + out.response[r, :pos].tolist()
            seq = torch.tensor([prefix + draft[r].tolist()])
            with torch.no_grad():
                s_full = near_teacher(input_ids=seq).logits[0, len(prefix) - 1:, :VOCAB_SIZE]
                t_full = teacher(input_ids=seq).logits[0, len(prefix) - 1:, :VOCAB_SIZE]
            g = draft.shape[1]
            torch.testing.assert_close(student_logits[r], s_full[:g], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(teacher_logits[r], t_full[: g + 1], atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > 4


def test_sampled_guidance_invariants(student, teacher, spec_calls):
    """Batch invariance (a row's tokens with stable keys do not depend on its batch), backends equal, and
    the student's tokens before the switch are step mode's; with bonus tokens taken."""
    ids, mask = random_prompts(4, 5, min_len=2, seed=8)
    policy = AdaSwitch(window=2, k=1.05, teacher_sampling=Sampling(0.9, top_k=40))
    kw = dict(policy=policy, max_new_tokens=10, eos_token_id=EOS_ID, pad_token_id=PAD_ID, lookahead=3,
              guidance="speculative", example_keys=[11, 12, 13, 14])
    full = generate(student, teacher, ids, mask, **kw)
    assert _count(spec_calls, "bonus") > 0
    kw2 = dict(kw, example_keys=[13, 11])
    part = generate(student, teacher, ids[[2, 0]], mask[[2, 0]], **kw2)
    for i, row in enumerate((2, 0)):
        n = int(full.lengths[row])
        assert torch.equal(part.response[i, :n], full.response[row, :n])
    for impl in IMPLS:
        out = generate(student, teacher, ids, mask, impl=impl, **kw)
        assert torch.equal(out.response, full.response) and torch.equal(out.from_teacher, full.from_teacher)
    step = generate(student, teacher, ids, mask, **dict(kw, lookahead=0, guidance="step"))
    assert torch.equal(step.switch_position, full.switch_position)
    for row in range(4):
        sw = int(full.switch_position[row])
        if sw > 0:
            assert torch.equal(step.response[row, :sw], full.response[row, :sw])
    assert full.from_teacher.any()


def test_guidance_reads_the_host_within_sync_every(student, teacher, prompts):
    n, every = 24, 4
    for policy in (SWITCHY, Teacher()):
        with SyncCounter() as counter:
            run(student, teacher, prompts, policy, max_new_tokens=n, lookahead=3, sync_every=every,
                guidance="speculative")
        assert counter.count <= math.ceil(n / every) + 3, dict(counter.by_op)


def test_guidance_bad_arguments(student, teacher, prompts):
    with pytest.raises(ValueError, match="guidance must be one of"):
        run(student, teacher, prompts, SWITCHY, guidance="fast")
    with pytest.raises(ValueError, match="pass lookahead >= 1"):
        run(student, teacher, prompts, SWITCHY, guidance="speculative")
    for policy in (SKD(top_k=3), Student()):
        with pytest.raises(ValueError, match="applies to the AdaSwitch and Teacher"):
            run(student, teacher, prompts, policy, lookahead=2, guidance="speculative")
    with pytest.raises(ValueError, match="student is required"):
        run(None, teacher, prompts, Teacher(), lookahead=2, guidance="speculative")


# ---------------------------------------------------------------------------------------------- teacher states

def _full_teacher_states(teacher, out):
    mask = out.attention_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = teacher(input_ids=out.sequences, attention_mask=mask, position_ids=positions,
                    output_hidden_states=True, use_cache=False).hidden_states[-1]
    p, n = out.prompt_length, out.response.shape[1]
    return h[:, p - 1: p - 1 + n]


@pytest.mark.parametrize(
    "policy,kw",
    [(SWITCHY, {}), (SWITCHY, {"lookahead": 3}), (SWITCHY, {"lookahead": 3, "guidance": "speculative"}),
     (SKD(top_k=5), {}), (SKD(top_k=5), {"lookahead": 4}), (Teacher(), {}),
     (Teacher(Sampling(0.8)), {"lookahead": 2, "guidance": "speculative"}), (Student(), {})],
    ids=["adaswitch", "adaswitch-look", "adaswitch-guided", "skd", "skd-look", "teacher", "teacher-guided",
         "student"],
)
def test_teacher_states_equal_a_full_forward(student, teacher, prompts, policy, kw, spec_calls):
    out = run(student, teacher, prompts, policy, return_teacher_states=True, **kw)
    if kw.get("guidance") == "speculative":  # the bonus positions' states are covered too
        assert _count(spec_calls, "bonus") > 0
    valid = out.attention_mask[:, out.prompt_length:].bool()
    if isinstance(policy, Student):  # the teacher never ran
        assert out.teacher_hidden_states is None and out.teacher_states_mask is None
        return
    assert torch.equal(out.teacher_states_mask, valid)  # the teacher ran on every response token
    ref = _full_teacher_states(teacher, out)
    torch.testing.assert_close(out.teacher_hidden_states[valid], ref[valid], atol=2e-5, rtol=1e-4)
    assert (out.teacher_hidden_states[~valid] == 0).all()
    plain = run(student, teacher, prompts, policy, **kw)
    assert torch.equal(plain.response, out.response) and plain.teacher_hidden_states is None
