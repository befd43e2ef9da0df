"""adaswitch.generate on tiny random-init models (CPU): the equalities of docs/spec.md section 6, EOS handling,
host-sync bounds, bad inputs. A Qwen2-style teacher whose embedding is padded past the tokenizer's
vocabulary (320 vs 300) and a Llama-style student, left-padded prompts of different lengths."""

import math
import warnings

import pytest
import torch
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE, random_prompts, tiny_student, tiny_teacher

from adaswitch import (
    SKD,
    AdaSwitch,
    FixedSwitch,
    Mixed,
    RandomSwitch,
    Sampling,
    Student,
    Teacher,
    generate,
    native_available,
)
from adaswitch.engine.sync import SyncCounter
from adaswitch.ops import rng

N = 16
B, P = 4, 6
SWITCHY = AdaSwitch(window=3, k=1.1)  # switches within a few tokens on random models


pytestmark = pytest.mark.usefixtures("one_thread")
# the fixtures teacher, student and prompts (B prompts of up to P tokens): tests/conftest.py


def run(student, teacher, prompts, policy, **kw):
    ids, mask = prompts
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("lookahead", 0)  # step mode unless a test asks for blocks (or "auto")
    kw.update(policy=policy, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return generate(student, teacher, ids, mask, **kw)


def assert_same(a, b):
    assert torch.equal(a.response, b.response)
    assert torch.equal(a.from_teacher, b.from_teacher)
    assert torch.equal(a.switch_position, b.switch_position)
    assert torch.equal(a.lengths, b.lengths)
    torch.testing.assert_close(a.divergence, b.divergence, equal_nan=True, atol=1e-5, rtol=1e-4)


def test_output_shapes_and_semantics(student, teacher, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no deprecation warnings from our calls into transformers
        out = run(student, teacher, prompts, SWITCHY)
    ids, mask = prompts
    assert out.sequences.shape == (B, P + N) and out.response.shape == (B, N)
    assert torch.equal(out.sequences[:, :P], ids) and torch.equal(out.sequences[:, P:], out.response)
    assert out.prompt_length == P
    assert (out.response < VOCAB_SIZE).all()  # the teacher's padded logits are never sampled
    sw = out.switch_position
    assert (sw >= 0).any(), "the forced policy should switch on some row"
    for r in range(B):
        s = sw[r].item()
        expected = torch.arange(N) >= s if s >= 0 else torch.zeros(N, dtype=torch.bool)
        assert torch.equal(out.from_teacher[r], expected)
        explored = torch.arange(N) <= s if s >= 0 else torch.ones(N, dtype=torch.bool)
        assert torch.equal(~out.divergence[r].isnan(), explored)  # divergence at exploration positions
    assert torch.equal(out.attention_mask, torch.cat([mask, torch.ones(B, N, dtype=torch.long)], 1))


def rule_switch_position(divergence: list[float], policy: AdaSwitch) -> int:
    """The AdaSwitch rule (docs/spec.md) applied, in plain Python, to the divergences a row recorded: the first
    position i that holds at least max(L, W) earlier divergences with d_i > K x the mean of the last L of
    them and d_i >= F; -1 if none (the row's exploration ended without a switch)."""
    held = []
    for i, d in enumerate(divergence):
        if math.isnan(d):  # not explored: the row had finished
            return -1
        assert math.isfinite(d), d  # tiny models: finite divergences only
        mean = sum(held[-policy.window:]) / policy.window if held else 0.0
        if len(held) >= policy.min_history and d > policy.k * mean and d >= policy.min_divergence:
            return i
        held.append(d)
    return -1


@pytest.mark.parametrize("g", [0, 3])
def test_switch_positions_follow_the_rule_read_back_from_divergence(student, teacher, g):
    """What a user sees: for every row, the switch position `generate` reports is where the rule, applied
    to the divergences it reports, switches; tokens come from the teacher from there on."""
    ids, mask = random_prompts(6, P, min_len=2, seed=5)
    policies = [SWITCHY, AdaSwitch(window=3, k=1.2), AdaSwitch(window=4, k=1.05),
                AdaSwitch(window=2, k=1.05, warmup=5, min_divergence=0.02)]
    seen = set()
    for policy in policies:
        out = run(student, teacher, (ids, mask), policy, lookahead=g)
        for r in range(ids.shape[0]):
            want = rule_switch_position(out.divergence[r].tolist(), policy)
            assert out.switch_position[r] == want, (policy, r, out.divergence[r])
            n = int(out.lengths[r])
            if want >= 0:
                assert not out.from_teacher[r, :want].any() and out.from_teacher[r, want:n].all()
            else:
                assert not out.from_teacher[r, :n].any()
        seen |= set(out.switch_position.tolist())
    assert len(seen - {-1}) >= 3 and -1 in seen  # switches at several positions, and rows that never switch


def test_teacher_greedy_matches_transformers_generate_with_eos():
    teacher = tiny_teacher()
    ids, mask = random_prompts(B, P, min_len=1, seed=7)
    probe = teacher.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD_ID,
                             eos_token_id=None)
    eos = int(probe[0, P + 5])  # a token row 0 emits: makes row 0 end early
    assert eos != PAD_ID
    ref = teacher.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False, pad_token_id=PAD_ID,
                           eos_token_id=eos)
    out = generate(None, teacher, ids, mask, policy=Teacher(Sampling(temperature=0)), max_new_tokens=N,
                   eos_token_id=eos, pad_token_id=PAD_ID)
    width = ref.shape[1] - P
    assert torch.equal(out.response[:, :width], ref[:, P:])
    assert (out.response[:, width:] == PAD_ID).all()
    first = (out.response[0] == eos).nonzero()[0, 0].item()
    assert out.lengths[0].item() == first + 1 <= 6
    assert (out.response[0, first + 1:] == PAD_ID).all() and not out.from_teacher[0, first + 1:].any()
    assert out.attention_mask[0, P:].sum().item() == first + 1
    assert out.from_teacher[0, : first + 1].all()


@pytest.mark.parametrize(
    "policy",
    [SWITCHY, AdaSwitch(window=2, k=1.05, warmup=4, student_sampling=Sampling(0.7, top_p=0.9)),
     SKD(top_k=5), SKD(top_k=40, student_sampling=Sampling(top_k=30), teacher_sampling=Sampling(0.5)),
     AdaSwitch(window=3, k=50.0, max_divergence=0.02), FixedSwitch(window=3, warmup=5),
     RandomSwitch(window=3, positions=(1, 4, 9, -1))],
    ids=["adaswitch", "adaswitch-warmup-topp", "skd5", "skd40-filtered", "adaswitch-absolute", "fixed-switch",
         "random-switch"],
)
@pytest.mark.parametrize("g", [1, 3, 5])
def test_lookahead_equals_step(student, teacher, prompts, policy, g):
    step = run(student, teacher, prompts, policy)
    look = run(student, teacher, prompts, policy, lookahead=g, sync_every=3)
    assert_same(step, look)


def test_adaswitch_infinite_k_is_student(student, teacher, prompts):
    ref = run(student, teacher, prompts, Student())
    for g in (0, 4):
        out = run(student, teacher, prompts, AdaSwitch(k=math.inf), lookahead=g)
        assert torch.equal(out.response, ref.response)
        assert not out.from_teacher.any() and (out.switch_position == -1).all()
        assert not out.divergence.isnan().any()  # every position explored


def test_controls_and_absolute_trigger_switch_where_defined(student, teacher, prompts):
    """FixedSwitch at the warm-up, RandomSwitch at each row's counter-based draw, and max_divergence = 0
    at position 0 (every divergence is > 0), in step and lookahead mode."""
    from adaswitch.policies import NEVER

    random = RandomSwitch(window=3, positions=(1, 4, 9, -1))
    drawn = random.switch_at(0, torch.arange(B))
    assert len(set(drawn.tolist())) > 1
    for g in (0, 3):
        fixed = run(student, teacher, prompts, FixedSwitch(window=3, warmup=5), lookahead=g)
        assert (fixed.switch_position == 5).all()
        assert torch.equal(fixed.from_teacher, (torch.arange(N) >= 5).expand(B, N))
        out = run(student, teacher, prompts, random, lookahead=g)
        assert torch.equal(out.switch_position, torch.where(drawn == NEVER, -1, drawn))
        absolute = run(student, teacher, prompts, AdaSwitch(window=3, k=50.0, max_divergence=0.0), lookahead=g)
        assert (absolute.switch_position == 0).all() and absolute.from_teacher.all()
    relative_only = run(student, teacher, prompts, AdaSwitch(window=3, k=50.0))
    assert (relative_only.switch_position == -1).all()


def test_skd_extremes(student, teacher, prompts):
    ref_student = run(student, teacher, prompts, Student())
    with pytest.warns(UserWarning, match="accepts every student token"):
        all_kept = run(student, teacher, prompts, SKD(top_k=VOCAB_SIZE + 20))
    assert torch.equal(all_kept.response, ref_student.response) and not all_kept.from_teacher.any()
    ts = Sampling(temperature=0.8)
    # Teacher alone would sample its padded vocabulary too; SKD cuts both models to the shared 300.
    ref_teacher = run(student, teacher, prompts, Teacher(ts), vocab_size=VOCAB_SIZE)
    for g in (0, 3):
        none_kept = run(student, teacher, prompts, SKD(top_k=0, teacher_sampling=ts), lookahead=g)
        assert torch.equal(none_kept.response, ref_teacher.response)
        assert none_kept.from_teacher.all()


def test_batch_invariance_with_example_keys(student, teacher):
    ids, mask = random_prompts(5, 7, min_len=2, seed=11)
    keys = torch.tensor([40, 41, 42, 43, 44])
    for policy, g in ((SWITCHY, 0), (SWITCHY, 3), (SKD(top_k=5), 0)):
        kw = dict(policy=policy, max_new_tokens=N, eos_token_id=EOS_ID, pad_token_id=PAD_ID, lookahead=g)
        full = generate(student, teacher, ids, mask, example_keys=keys, **kw)
        # Row 3 alone, unpadded, then rows (3, 0) reordered with extra left padding.
        n3 = int(mask[3].sum())
        alone = generate(student, teacher, ids[3:4, -n3:], None, example_keys=[43], **kw)
        pad = torch.full((2, 3), PAD_ID)
        re_ids = torch.cat([pad, ids[[3, 0]]], 1)
        re_mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), mask[[3, 0]]], 1)
        mixed = generate(student, teacher, re_ids, re_mask, example_keys=keys[[3, 0]], **kw)
        for other, row in ((alone, 0), (mixed, 0)):
            assert torch.equal(other.response[row], full.response[3])
            assert torch.equal(other.from_teacher[row], full.from_teacher[3])
            assert other.switch_position[row] == full.switch_position[3]
        assert torch.equal(mixed.response[1], full.response[0])


def test_mixed_rows(student, teacher, prompts):
    completions = torch.randint(4, VOCAB_SIZE, (B, 10))
    completions[1, 7:] = PAD_ID  # a shorter completion
    completions[2, 4] = EOS_ID
    policy = Mixed(lmbda=0.5)
    out = run(student, teacher, prompts, policy, completions=completions)
    coin = rng.mixed_coin(0, torch.arange(B), 0.5)
    assert torch.equal(out.from_dataset, ~coin) and coin.any() and (~coin).any()
    ref = run(student, teacher, prompts, Student())
    for r in range(B):
        if coin[r]:
            assert torch.equal(out.response[r], ref.response[r])
        else:
            n = int(out.lengths[r])
            assert torch.equal(out.response[r, :n], completions[r, :n])
            assert (out.response[r, n:] == PAD_ID).all()
            assert n == {1: 7, 2: 5}.get(r, 10)
    assert not out.from_teacher.any()
    everything = run(student, teacher, prompts, Mixed(lmbda=0.0), completions=completions)
    assert everything.from_dataset.all()


SYNC_POLICIES = [
    (Student(), 0), (Teacher(), 0), (Mixed(0.5), 0), (SKD(top_k=5), 0), (SKD(top_k=5), 4),
    (SWITCHY, 0), (SWITCHY, 4), (AdaSwitch(k=math.inf), 2),
]


@pytest.mark.parametrize("policy,g", SYNC_POLICIES, ids=[f"{type(p).__name__}-{g}" for p, g in SYNC_POLICIES])
def test_host_syncs_bounded(student, teacher, prompts, policy, g):
    n, every = 24, 4
    kw = {"completions": torch.randint(4, VOCAB_SIZE, (B, 5))} if isinstance(policy, Mixed) else {}
    with SyncCounter() as counter:
        run(student, teacher, prompts, policy, max_new_tokens=n, lookahead=g, sync_every=every, **kw)
    # ceil(n / every) + 1 loop reads + 2 argument checks (prompt padding, token range) before the loop
    assert counter.count <= math.ceil(n / every) + 3, dict(counter.by_op)


def test_sync_counter_counts_host_reads():
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x[1].item()
        bool(x[2] > 1)
        x.tolist()
        x[x > 2]
        torch.equal(x, x)
        y = x * 2  # no read
    assert counter.count == 5, dict(counter.by_op)
    assert y.tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]  # Tensor.tolist restored


def test_backends_match_reference(student, teacher):
    """Triton (interpreter) and the native CPU op give the PyTorch reference's tokens (the other tests run
    impl="auto": native when built)."""
    ids, mask = random_prompts(2, 4, min_len=2, seed=3)
    impls = ["triton"] + (["native"] if native_available() else [])
    for policy, g in ((SWITCHY, 0), (SKD(top_k=5), 2)):
        kw = dict(policy=policy, max_new_tokens=6, eos_token_id=EOS_ID, pad_token_id=PAD_ID, lookahead=g)
        ref = generate(student, teacher, ids, mask, impl="torch", **kw)
        for impl in impls:
            assert_same(ref, generate(student, teacher, ids, mask, impl=impl, **kw))


def _bad(models, prompts, match, **kw):
    """generate(...) with one argument changed from a valid call raises an error matching `match`."""
    args = dict(student=models[0], teacher=models[1], input_ids=prompts[0], attention_mask=prompts[1],
                policy=SWITCHY, max_new_tokens=N, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    args.update(kw)
    with pytest.raises((ValueError, TypeError), match=match):
        generate(**args)


def test_bad_inputs(student, teacher, prompts):
    ids, mask = prompts
    no_eos = tiny_student()
    no_eos.config.eos_token_id = None
    no_eos.config.pad_token_id = None
    many_eos = tiny_student()
    many_eos.config.eos_token_id = [EOS_ID, 7]
    _bad((many_eos, None), prompts, "eos_token_id is missing", eos_token_id=None, policy=Student())
    other_tok = tiny_student()
    other_tok.config.eos_token_id = 5
    small_vocab = tiny_student(vocab_size=100)
    short = tiny_student(max_positions=P + 4)
    _bad((student, teacher), prompts, "policy must be", policy="adaswitch")
    _bad((student, teacher), prompts, "student is required", student=None)
    _bad((student, teacher), prompts, "teacher is required", teacher=None)
    _bad((no_eos, None), prompts, "eos_token_id is missing", eos_token_id=None, policy=Student())
    _bad((no_eos, None), prompts, "pad_token_id is missing", pad_token_id=None, policy=Student())
    _bad((other_tok, teacher), prompts, "share a tokenizer")
    _bad((small_vocab, teacher), prompts, r"input_ids must lie in \[0, 100\)")
    _bad((student, teacher), prompts, "vocab_size=400 exceeds", vocab_size=400)
    _bad((student, teacher), prompts, "eos_token_id must be an int", eos_token_id=VOCAB_SIZE)
    _bad((short, teacher), prompts, "max_position_embeddings", max_new_tokens=5)
    _bad((student, teacher), prompts, "max_new_tokens must be", max_new_tokens=0)
    _bad((student, teacher), prompts, "left padding", attention_mask=mask.flip(1))
    _bad((student, teacher), prompts, "input_ids must be an int64", input_ids=ids.float())
    _bad((student, teacher), prompts, "lookahead > 0 applies", policy=Student(), lookahead=2)
    _bad((student, teacher), prompts, "sync_every must be", sync_every=0)
    _bad((student, teacher), prompts, "cuda_graph=True needs CUDA", cuda_graph=True)
    _bad((student, teacher), prompts, "completions are required", policy=Mixed(0.5))
    _bad((student, teacher), prompts, "completions apply", completions=ids)
    masked = torch.full((ids.shape[0], 3), PAD_ID)
    masked[1, 2] = -100
    _bad((student, teacher), prompts, r"completions must hold token ids in \[0, 300\).*-100 is a label mask",
         policy=Mixed(0.5), completions=masked)
    _bad((student, teacher), prompts, r"completions must hold token ids in \[0, 300\).*got 300", policy=Mixed(0.5),
         completions=torch.full((ids.shape[0], 3), VOCAB_SIZE))
    _bad((student, teacher), prompts, "example_keys must be", example_keys=[1, 2])
    no_window = tiny_teacher()
    no_window.config.layer_types = ["sliding_attention"] * no_window.config.num_hidden_layers
    no_window.config.sliding_window = None
    _bad((student, no_window), prompts, "config.sliding_window is None; expected an int >= 1")
    linear = tiny_teacher()
    linear.config.layer_types = ["linear_attention", "full_attention", "full_attention"]
    _bad((student, linear), prompts, "has linear_attention layers")


def test_mixed_dtypes_bf16_teacher_fp32_student(student):
    """A bf16 teacher with an fp32 student (each model's logits in its own dtype): every backend, both modes."""
    teacher = tiny_teacher(dtype=torch.bfloat16)
    ids, mask = random_prompts(3, 5, min_len=2, seed=1)
    kw = dict(policy=SWITCHY, max_new_tokens=8, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    ref = generate(student, teacher, ids, mask, impl="torch", **kw)
    assert ref.response.shape == (3, 8) and (ref.switch_position >= 0).any()
    assert_same(ref, generate(student, teacher, ids, mask, **kw))
    look = generate(student, teacher, ids, mask, lookahead=3, **kw)
    # bf16 teacher logits from a 3-token forward round differently from 1-token forwards: same decisions
    # here, divergences within bf16 precision.
    assert torch.equal(look.response, ref.response) and torch.equal(look.switch_position, ref.switch_position)
    torch.testing.assert_close(look.divergence, ref.divergence, equal_nan=True, atol=2e-2, rtol=2e-2)


def test_default_sync_every_stops_at_the_first_finished_step_on_cpu(student, teacher, prompts):
    """On the CPU the default reads the flags every iteration: the student stops the step after every row
    has switched, and the loop the step after every row is done (sync_every=16 runs on to its next read)."""
    calls = {"student": 0}

    def count(module, args, kwargs):
        if kwargs.get("input_ids") is not None and kwargs["input_ids"].shape[1] == 1:
            calls["student"] += 1

    n = 24
    handle = student.register_forward_pre_hook(count, with_kwargs=True)
    try:
        default = run(student, teacher, prompts, SWITCHY, max_new_tokens=n)
        eager = calls["student"]
        calls["student"] = 0
        sparse = run(student, teacher, prompts, SWITCHY, max_new_tokens=n, sync_every=16)
        lazy = calls["student"]
    finally:
        handle.remove()
    assert_same(default, sparse)  # the read interval never changes a token
    sw = default.switch_position
    assert (sw >= 0).all() and int(sw.max()) < n - 2, "every row must switch well before the budget"
    # student decode forwards: positions 1 .. last switch (the switching step reads both models; position 0's
    # logits come with the prompt's prefill)
    assert eager == int(sw.max()), (eager, sw.tolist())
    assert lazy > eager
