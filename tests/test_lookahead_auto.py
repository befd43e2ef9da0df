"""lookahead="auto" (adaswitch.engine.lookahead): the choice of G and guidance never changes a token, adds no
host read, follows the cost model, and what it learns is carried across generate calls and Distiller steps.

- tokens: a scripted chooser changes (G, guidance) at every host read, through every option the policy has
  (blocks of 2, 4, 8 and speculative blocks where allowed); the output equals step mode's (AdaSwitch with rows
  that switch, SKD with rejected drafts, AdaSwitch and Teacher with a greedy teacher and verified blocks), at
  sync_every 1 and 3;
- host reads: auto reads no more often than step mode at the same sync_every;
- the model: `choose` on made-up timings picks long blocks for an expensive teacher and a student it keeps,
  token by token when drafts are rejected or a row has switched (step guidance), verification for switched
  rows when it pays; the timing line and the priors;
- the Distiller: one LookaheadStats across steps, in every checkpoint (lookahead_stats.json), back on resume;
  `mean_lookahead` logged; DistillConfig / resume take "auto".
"""

import json
import math

import pytest
import torch
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE, tiny_distiller

import adaswitch.engine.generate as engine
from adaswitch import SKD, AdaSwitch, FixedSwitch, LookaheadStats, Sampling, Teacher, generate
from adaswitch.engine.lookahead import Rows, block_moments, choose, expected_tokens, slowest_row_iterations
from adaswitch.engine.sync import SyncCounter

pytestmark = pytest.mark.usefixtures("one_thread")
# the fixtures teacher, student and prompts (B prompts of up to P tokens): tests/conftest.py

N, B, P = 17, 5, 6


@pytest.fixture
def scripted(monkeypatch):
    """Replaces the engine's choice by a cycle through the options it is offered (a new (G, guidance) at every
    host read); returns the list of choices made."""
    made = []

    def cycle(stats, options, rows):
        if not options:
            return 0, False
        choice = options[len(made) % len(options)]
        made.append(choice)
        return choice

    monkeypatch.setattr(engine, "choose", cycle)
    return made


def run(student, teacher, prompts, policy, **kw):
    ids, mask = prompts
    kw.setdefault("max_new_tokens", N)
    kw.update(policy=policy, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=VOCAB_SIZE)
    return generate(student, teacher, ids, mask, **kw)


def assert_same_tokens(step, auto):
    for field in ("response", "from_teacher", "lengths", "switch_position"):
        assert torch.equal(getattr(step, field), getattr(auto, field)), field
    torch.testing.assert_close(step.divergence, auto.divergence, equal_nan=True, atol=1e-5, rtol=1e-4)


CASES = {
    "adaswitch-sampled": AdaSwitch(window=3, k=1.1),
    "fixed-switch-sampled": FixedSwitch(position=5),
    "skd-sampled": SKD(top_k=3),
    "adaswitch-greedy-teacher": AdaSwitch(window=2, k=1.05, teacher_sampling=Sampling(0.0)),
    "teacher-greedy": Teacher(sampling=Sampling(0.0)),
}


@pytest.mark.parametrize("sync_every", [1, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_tokens_do_not_depend_on_the_choices(near_teacher, teacher, prompts, scripted, name, sync_every):
    policy = CASES[name]
    step = run(near_teacher, teacher, prompts, policy, lookahead=0, guidance="step", sync_every=sync_every)
    auto = run(near_teacher, teacher, prompts, policy, sync_every=sync_every)
    assert_same_tokens(step, auto)
    blocks = {g for g, _ in scripted if g > 0}
    assert len(blocks) >= 2, scripted  # G changed mid-sequence
    assert auto.mean_lookahead > 0
    if isinstance(policy, AdaSwitch):
        assert (auto.switch_position >= 0).any()  # rows switched, inside blocks and between them
    if isinstance(policy, SKD):
        assert auto.from_teacher.any() and (~auto.from_teacher & (auto.response != PAD_ID)).any()  # drafts rejected
    greedy = policy.teacher_sampling.greedy
    assert any(v for _, v in scripted) == greedy  # "auto" verifies speculatively only for a greedy teacher


def test_speculative_guidance_with_auto_lookahead_keeps_greedy_tokens(near_teacher, teacher, prompts, scripted):
    policy = CASES["adaswitch-greedy-teacher"]
    step = run(near_teacher, teacher, prompts, policy, lookahead=0, guidance="step")
    auto = run(near_teacher, teacher, prompts, policy, guidance="speculative")
    assert_same_tokens(step, auto)
    assert all(v for _, v in scripted) and len({g for g, _ in scripted}) >= 2


def test_real_choices_keep_the_tokens_and_learn(near_teacher, teacher, prompts):
    """The engine's own choice (timings of this machine): same tokens on every call, the stats grow."""
    policy = CASES["adaswitch-sampled"]
    step = run(near_teacher, teacher, prompts, policy, lookahead=0)
    stats = LookaheadStats()
    for _ in range(3):
        assert_same_tokens(step, run(near_teacher, teacher, prompts, policy, lookahead_stats=stats))
    assert stats.cost("student", 1) > 0 and stats.cost("teacher", 1) > 0
    assert stats.drafts[0] > 0 and 0 < stats.acceptance() < 1
    assert sum(stats.iterations.values()) >= 3 * 2


@pytest.mark.parametrize("name", ["adaswitch-sampled", "skd-sampled"])
def test_auto_reads_the_host_no_more_than_step_mode(near_teacher, teacher, prompts, name):
    policy = CASES[name]
    counts = {}
    for lookahead in (0, "auto"):
        with SyncCounter() as sc:
            run(near_teacher, teacher, prompts, policy, lookahead=lookahead, sync_every=4)
        counts[lookahead] = sc.count
    assert counts["auto"] <= counts[0], counts


def _stats(student=1.0, teacher=None, drafts=(0.0, 0.0), verified=(0.0, 0.0)):
    stats = LookaheadStats()
    stats.seconds["student:1"] = [student]
    for q, t in (teacher or {1: 2.0}).items():
        stats.seconds[f"teacher:{q}"] = [t]
    stats.drafts, stats.verified = list(drafts), list(verified)
    return stats


OPTIONS = [(0, False), (2, False), (4, False), (8, False)]
GUIDED = OPTIONS + [(2, True), (4, True), (8, True)]


def test_choose_follows_the_cost_model():
    exploring = Rows(exploring=True, switched=False, student=True, live=1, remaining=40)
    # nothing timed yet: step mode (the measurement)
    assert choose(LookaheadStats(), OPTIONS, exploring) == (0, False)
    # an expensive teacher whose forward costs little more for 8 positions, drafts nearly always kept: long blocks
    cheap_blocks = _stats(student=1.0, teacher={1: 10.0, 8: 11.0}, drafts=(1000, 990))
    assert choose(cheap_blocks, OPTIONS, exploring) == (8, False)
    # the same teacher, drafts usually rejected: token by token
    assert choose(_stats(student=1.0, teacher={1: 10.0, 8: 11.0}, drafts=(1000, 50)), OPTIONS, exploring) == (0, False)
    # a teacher forward linear in its positions: blocks save nothing
    linear = _stats(student=1.0, teacher={1: 2.0, 4: 8.0}, drafts=(1000, 990))
    assert choose(linear, OPTIONS, exploring) == (0, False)
    # a switched row gains one token per step-guided block: token by token
    mixed = Rows(exploring=True, switched=True, student=True, live=4, remaining=40)
    assert choose(cheap_blocks, OPTIONS, mixed) == (0, False)
    # with verification that keeps most drafts, switched rows take speculative blocks
    verifying = _stats(student=1.0, teacher={1: 10.0, 9: 11.0}, drafts=(1000, 990), verified=(1000, 950))
    assert choose(verifying, GUIDED, mixed) == (8, True)
    # the teacher alone after every row switched: step without the student when verification fails
    switched = Rows(exploring=False, switched=True, student=True, live=4, remaining=40)
    failing = _stats(student=1.0, teacher={1: 10.0, 9: 11.0}, verified=(1000, 10))
    assert choose(failing, GUIDED, switched) == (0, False)


def test_the_slowest_of_many_rows_prefers_shorter_blocks():
    """One row: G = 8 keeps the most tokens per second; 32 rows: the unluckiest row's rejections make G = 4
    faster (what the demo pair's SKD showed before the model counted it)."""
    stats = _stats(student=1.0, teacher={1: 1.8, 4: 2.5, 8: 3.3}, drafts=(1000, 940))
    assert choose(stats, OPTIONS, Rows(True, False, True, live=1, remaining=40)) == (8, False)
    assert choose(stats, OPTIONS, Rows(True, False, True, live=32, remaining=40)) == (4, False)
    # more rows, more iterations; one row: the mean; no spread: exactly tokens / mean
    mean, variance = block_moments(0.9, 4, bonus=False)
    assert math.isclose(mean, expected_tokens(0.9, 4))
    one, many = (slowest_row_iterations(40, b, mean, variance) for b in (1, 32))
    assert math.isclose(one, 40 / mean, rel_tol=0.05) and many > one * 1.1
    assert math.isclose(slowest_row_iterations(40, 32, 4.0, 0.0), 10.0)
    assert block_moments(1.0, 4, bonus=True) == (5.0, 0.0)


def test_measured_iterations_override_the_forward_model():
    """An option whose whole iterations were timed is priced at that time, the others at their forwards
    scaled by what the timed ones cost beyond their forwards."""
    stats = _stats(student=1.0, teacher={1: 10.0, 8: 11.0}, drafts=(1000, 990))
    rows = Rows(True, False, True, live=1, remaining=40)
    assert choose(stats, OPTIONS, rows) == (8, False)
    stats.iteration_seconds["8"] = [500.0]  # G = 8 blocks turned out slow
    stats.iteration_seconds["0"] = [11.0]
    stats.iteration_seconds["4"] = [20.0]
    assert choose(stats, OPTIONS, rows) == (4, False)
    # untimed G = 2 (forwards 12.1 s) priced at the timed iterations' median overhead: 13.9x when G = 4 is slow
    stats.iteration_seconds["4"] = [200.0]
    assert choose(stats, OPTIONS, rows) == (0, False)
    del stats.iteration_seconds["8"], stats.iteration_seconds["4"]  # only step timed, at its forwards' cost
    assert choose(stats, OPTIONS, rows) == (8, False)


def test_the_timing_line_and_priors():
    stats = _stats(student=1.0, teacher={1: 2.0})
    assert stats.cost("teacher", 1) == 2.0
    assert math.isclose(stats.cost("teacher", 5), 1.0 + 1.0 * 5)  # half of it fixed until a block is timed
    stats.seconds["teacher:4"] = [5.0]
    assert math.isclose(stats.cost("teacher", 8), 1.0 + 8.0)  # the line through (1, 2) and (4, 5)
    assert stats.cost("nobody", 1) is None
    stats.seconds["teacher:1"] = [9.0, 2.0, 2.0, 2.0]  # a warm-up outlier: the median
    assert stats.cost("teacher", 1) == 2.0
    assert LookaheadStats().acceptance() == 0.5
    assert expected_tokens(0.5, 3) == 1.75 and expected_tokens(1.0, 4) == 4.0


def test_stats_round_trip_and_malformed_state():
    stats = _stats(drafts=(10, 7), verified=(3, 1))
    stats.iterations = {"0": 4, "4+spec": 2}
    stats.iteration_seconds = {"0": [0.5], "0/teacher": [0.25]}
    again = LookaheadStats.from_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert again == stats
    again.new_call()
    assert again.drafts == [5.0, 3.5]
    with pytest.raises(ValueError, match="seconds, drafts"):
        LookaheadStats.from_state_dict({"seconds": {}})
    with pytest.raises(ValueError, match="two counts"):
        LookaheadStats.from_state_dict({"seconds": {}, "drafts": [1, -1], "verified": [0, 0], "iterations": {}})


def test_bad_lookahead_and_stats_are_refused(student, teacher, prompts):
    with pytest.raises(ValueError, match="lookahead must be 'auto' or an int >= 0"):
        run(student, teacher, prompts, AdaSwitch(), lookahead="fast")
    with pytest.raises(ValueError, match="guidance must be one of"):
        run(student, teacher, prompts, AdaSwitch(), guidance="quick")
    with pytest.raises(TypeError, match="lookahead_stats must be an adaswitch.LookaheadStats"):
        run(student, teacher, prompts, AdaSwitch(), lookahead_stats={})


# ----------------------------------------------------------------------------------------- Distiller

def test_distiller_carries_the_stats_and_saves_them(tmp_path):
    from adaswitch.train.run_state import LOOKAHEAD_STATS_NAME

    trainer = tiny_distiller(tmp_path, policy="adaswitch", window=2, k=1.05, max_steps=3, save_strategy="steps",
                             save_steps=2, max_new_tokens=8)
    assert trainer.args.lookahead == "auto" and trainer.args.guidance == "auto"
    trainer.train()
    stats = trainer.lookahead_stats
    assert sum(stats.iterations.values()) >= 3 and stats.cost("teacher", 1) > 0  # over the three steps
    assert all("mean_lookahead" in h for h in trainer.state.log_history if "loss" in h)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / LOOKAHEAD_STATS_NAME).read_text())
    assert set(saved) == {"seconds", "drafts", "verified", "iterations", "iteration_seconds"} and saved["seconds"]

    resumed = tiny_distiller(tmp_path, policy="adaswitch", window=2, k=1.05, max_steps=3, save_strategy="steps",
                             save_steps=2, max_new_tokens=8)
    loaded = []
    original = engine.generate

    def spy(*args, **kw):
        loaded.append(dict(kw["lookahead_stats"].iterations))
        return original(*args, **kw)

    resumed_train = resumed.train
    try:
        engine.generate = spy
        resumed_train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    finally:
        engine.generate = original
    assert loaded and loaded[0] == saved["iterations"]  # the first step after resume starts from the checkpoint's


def test_config_takes_auto_and_numbers(tmp_path):
    from adaswitch import DistillConfig

    base = dict(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[])
    assert DistillConfig(**base, policy="skd").lookahead == "auto"
    assert DistillConfig(**base, policy="skd", lookahead="4").lookahead == 4  # as the command line gives it
    with pytest.raises(ValueError, match="lookahead must be 'auto' or an int >= 0"):
        DistillConfig(**base, lookahead="fast")
    with pytest.raises(ValueError, match="guidance must be one of"):
        DistillConfig(**base, guidance="quick")
    DistillConfig(**base, policy="adaswitch", guidance="speculative")  # auto lookahead verifies


def test_auto_guidance_resumes_a_step_guidance_checkpoint(tmp_path):
    """guidance="auto" writes step guidance's tokens, so checkpoints of either resume under the other."""
    from adaswitch import DistillConfig
    from adaswitch.train.resume import run_settings

    base = dict(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], policy="adaswitch")
    assert run_settings(DistillConfig(**base, guidance="auto")) == run_settings(DistillConfig(**base, guidance="step"))
    assert run_settings(DistillConfig(**base, guidance="speculative")) != run_settings(DistillConfig(**base))
