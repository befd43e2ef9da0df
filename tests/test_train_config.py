"""DistillConfig: every bad field is a ValueError naming it; the policy object matches the fields."""

import math

import pytest

from adaswitch import SKD, AdaSwitch, DistillConfig, Mixed, Sampling, Student, Teacher


def make(**kw):
    return DistillConfig(output_dir="unused", report_to=[], use_cpu=True, **kw)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("policy", "greedy"),
        ("lmbda", 1.5),
        ("skd_top_k", -1),
        ("window", 0),
        ("k", 0.0),
        ("k", math.nan),
        ("switch_divergence", "kl"),
        ("warmup", -2),
        ("min_divergence", -0.1),
        ("max_divergence", -1.0),
        ("max_divergence", math.nan),
        ("switch_position", -1),
        ("switch_positions", [3, -2]),
        ("switch_weights", [1.0, -1.0]),
        ("switch_temperature", 0.0),
        ("student_temperature", -1.0),
        ("teacher_top_k", 1.5),
        ("student_top_p", 0.0),
        ("max_new_tokens", 0),
        ("lookahead", -1),
        ("sync_every", 0),
        ("max_prompt_length", 0),
        ("loss_kind", "mse"),
        ("beta", 2.0),
        ("alpha", -0.5),
        ("loss_temperature", math.inf),
        ("token_mask", "prompt"),
        ("remove_unused_columns", True),
    ],
)
def test_bad_field_names_itself(field, value):
    # each policy parameter under a policy that takes it: the value itself is refused, by the policy's check
    policy = {"lmbda": "mixed", "skd_top_k": "skd", "switch_position": "fixed_switch",
              "switch_positions": "random_switch", "switch_weights": "random_switch"}.get(field, "adaswitch")
    extra = {"switch_positions": [1, 2]} if policy == "random_switch" and field != "switch_positions" else {}
    with pytest.raises(ValueError, match=field) as info:
        make(**{"policy": policy, field: value, **extra})
    assert "applies to" not in str(info.value)


def test_combinations_that_make_no_sense():
    with pytest.raises(ValueError, match="lookahead"):
        make(policy="student", lookahead=4)
    with pytest.raises(ValueError, match="token_mask"):
        make(policy="dataset", token_mask="student")
    with pytest.raises(ValueError, match="token_mask='teacher' selects no tokens with policy 'mixed'"):
        make(policy="mixed", token_mask="teacher")
    with pytest.raises(ValueError, match="token_mask='student' selects no tokens with policy 'teacher'"):
        make(policy="teacher", token_mask="student")


def test_build_policy():
    s = Sampling(0.7, 5, 0.9)
    t = Sampling(0.0, 0, 1.0)
    ks = dict(student_temperature=0.7, student_top_k=5, student_top_p=0.9)
    kw = dict(**ks, teacher_temperature=0.0)
    assert make(policy="dataset").build_policy() is None
    assert make(policy="student", **ks).build_policy() == Student(sampling=s)
    assert make(policy="teacher", teacher_temperature=0.0).build_policy() == Teacher(sampling=t)
    assert make(policy="mixed", lmbda=0.25, **ks).build_policy() == Mixed(lmbda=0.25, sampling=s)
    assert make(policy="skd", skd_top_k=3, **kw).build_policy() == SKD(
        top_k=3, student_sampling=s, teacher_sampling=t
    )
    got = make(
        policy="adaswitch",
        window=4,
        k=math.inf,
        switch_divergence="jsd",
        warmup=6,
        min_divergence=0.5,
        switch_temperature=2.0,
        beta=0.3,
        alpha=0.2,
        **kw,
    ).build_policy()
    assert got == AdaSwitch(
        window=4,
        k=math.inf,
        divergence="jsd",
        warmup=6,
        min_divergence=0.5,
        divergence_temperature=2.0,
        beta=0.3,
        alpha=0.2,
        student_sampling=s,
        teacher_sampling=t,
    )


def test_build_switch_controls_and_absolute_trigger():
    from adaswitch import FixedSwitch, RandomSwitch

    kw = dict(window=4, warmup=6, switch_divergence="tvd", max_divergence=2.5)
    assert make(policy="adaswitch", **kw).build_policy() == AdaSwitch(
        window=4, warmup=6, divergence="tvd", max_divergence=2.5)
    assert make(policy="fixed_switch", **kw).build_policy() == FixedSwitch(
        window=4, warmup=6, divergence="tvd", max_divergence=2.5)
    assert make(policy="fixed_switch", switch_position=3).build_policy().switch_position == 3
    got = make(policy="random_switch", switch_positions=[3, 9, -1], switch_weights=[2, 1, 1], lookahead=4)
    got = got.build_policy()
    assert got == RandomSwitch(positions=(3, 9, -1), weights=(2.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="switch_positions is required"):
        make(policy="random_switch")
    with pytest.raises(ValueError, match="weights"):
        make(policy="random_switch", switch_positions=[3, 9], switch_weights=[1.0])


def test_fields_are_documented_and_completions_flag():
    import dataclasses

    ours = [f for f in dataclasses.fields(DistillConfig) if f.name in DistillConfig.__annotations__]
    assert len(ours) > 20 and all(f.metadata.get("help") for f in ours)
    assert make(policy="mixed").uses_completions and not make(policy="adaswitch").uses_completions


@pytest.mark.parametrize("policy", ["adaswitch", "fixed_switch", "skd", "student", "teacher", "mixed"])
def test_default_lookahead_by_policy(policy):
    """lookahead and guidance default to "auto" for every policy (the engine picks per block; policies with
    nothing to draft decode token by token); anything set explicitly is kept."""
    config = make(policy=policy)
    assert (config.lookahead, config.guidance) == ("auto", "auto")
    if policy in ("adaswitch", "fixed_switch"):
        explicit = make(policy=policy, lookahead=4, guidance="speculative")
        assert (explicit.lookahead, explicit.guidance) == (4, "speculative")
