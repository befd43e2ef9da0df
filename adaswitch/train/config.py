"""`DistillConfig`: the training arguments of a distillation run (a `transformers.TrainingArguments`).

Being a TrainingArguments subclass is what brings accelerate (multi-process DDP), checkpoints, resume,
logging and `report_to`; the fields below add the generation policy, the per-model sampling
settings and the loss (docs/spec.md sections 2 and 5). Fields are documented TRL-style through
`metadata={"help": ...}`, so `HfArgumentParser` and the `adaswitch distill` command show them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from adaswitch._validation import KINDS, LOSS_KINDS, SAMPLED_KIND
from adaswitch.ops.sampled import DEFAULT_IMPORTANCE_CAP
from adaswitch.train.distributed import accelerator_available, launched_processes

POLICY_NAMES = ("student", "teacher", "dataset", "mixed", "skd", "adaswitch", "fixed_switch", "random_switch")
# AdaSwitch and its two controls (the switch without the divergence test): the policies with a switch.
SWITCH_POLICIES = ("adaswitch", "fixed_switch", "random_switch")
# SKD's lookahead when none is given: on the step-cost benchmark (benchmarks/results/distill_step_cpu.md)
# G = 4 drafts per teacher forward is faster than token by token for SKD (same tokens); the other
# policies default to token by token, their fastest setting there.
SKD_DEFAULT_LOOKAHEAD = 4
TOKEN_MASKS = ("all", "student", "teacher")
LOSS_REDUCTIONS = ("mean", "sequence_mean")  # over the loss tokens; over the sequences of their summed losses
GUIDANCES = ("step", "speculative")
# The policies whose responses come (at least partly) from the dataset's `completion` column.
POLICIES_USING_COMPLETIONS = ("dataset", "mixed")
_STUDENT_SAMPLES = ("student", "mixed", "skd", *SWITCH_POLICIES)
_TEACHER_SAMPLES = ("teacher", "skd", *SWITCH_POLICIES)
# Each policy parameter -> the policies whose policy object takes it (beta and alpha also shape the loss).
POLICY_PARAMETERS = {
    "lmbda": ("mixed",),
    "skd_top_k": ("skd",),
    **dict.fromkeys(
        ("window", "k", "switch_divergence", "warmup", "min_divergence", "max_divergence", "switch_temperature"),
        SWITCH_POLICIES,
    ),
    "switch_position": ("fixed_switch",),
    "switch_positions": ("random_switch",),
    "switch_weights": ("random_switch",),
    **{f"student_{n}": _STUDENT_SAMPLES for n in ("temperature", "top_k", "top_p")},
    **{f"teacher_{n}": _TEACHER_SAMPLES for n in ("temperature", "top_k", "top_p")},
}


def _is_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


@dataclass
class DistillConfig(TrainingArguments):
    r"""Configuration of [`Distiller`]: the `TrainingArguments` fields plus the generation policy, the
    sampling settings of each model and the distillation loss.

    Parameters that control the policy:
        policy (`str`, defaults to `"adaswitch"`): where the response tokens come from: `"student"`
            (on-policy), `"teacher"` (sequence-level KD), `"dataset"` (the dataset's completions),
            `"mixed"` (per sequence the student with probability `lmbda`, else the dataset), `"skd"`
            (speculative KD), `"adaswitch"` (the student until its divergence spikes, then the teacher),
            or AdaSwitch's controls without the divergence test: `"fixed_switch"` (the student writes
            `switch_position` tokens, default the warm-up) and `"random_switch"` (each sequence switches
            at a position drawn from `switch_positions` / `switch_weights`).
        lmbda, skd_top_k, window, k, switch_divergence, warmup, min_divergence, max_divergence,
        switch_temperature, switch_position, switch_positions, switch_weights: the parameters of those
            policies (see each field's help). One set to other than its default for a policy that does not
            take it is an error (it would change nothing).

    Parameters that control sampling: `student_temperature`, `student_top_k`, `student_top_p` and the
    same three for the teacher; `max_new_tokens`, `lookahead`, `guidance`, `sync_every`,
    `max_prompt_length`; `reuse_teacher_states` (the loss takes the teacher's states from generation).

    Parameters that control the loss: `loss_kind`, `beta`, `alpha`, `loss_temperature`, `token_mask`,
    `loss_reduction`, `weight_hard_loss` / `weight_soft_loss` / `hard_label_mask` (Liger's names), and the
    sampled-token form's `sampled_discount` / `sampled_importance_cap`.
    """

    # ---- policy ------------------------------------------------------------------------------------
    policy: str = field(
        default="adaswitch",
        metadata={"help": "Where response tokens come from.", "choices": POLICY_NAMES},
    )
    lmbda: float = field(
        default=0.5,
        metadata={
            "help": "mixed: probability that a sequence is generated by the student (else the dataset's "
            "completion is used), in [0, 1]."
        },
    )
    skd_top_k: int = field(
        default=25,
        metadata={
            "help": "skd: a student token is kept when it is among the teacher's top-k logits, else the "
            "teacher draws a replacement. 0 = every token from the teacher."
        },
    )
    window: int = field(
        default=8,
        metadata={"help": "adaswitch: L, number of earlier divergences in the moving average (>= 1)."},
    )
    k: float = field(
        default=1.5,
        metadata={
            "help": "adaswitch: K, switch when the divergence exceeds K x its moving average (> 0; inf = "
            "never switch)."
        },
    )
    switch_divergence: str = field(
        default="forward_kl",
        metadata={"help": "adaswitch: the divergence compared with its moving average.", "choices": KINDS},
    )
    warmup: int | None = field(
        default=None,
        metadata={
            "help": "adaswitch: W, a row may switch once it holds max(L, W) earlier divergences "
            "(default: W = L)."
        },
    )
    min_divergence: float = field(
        default=0.0, metadata={"help": "adaswitch: F, a spike must also reach this divergence (>= 0)."}
    )
    max_divergence: float = field(
        default=math.inf,
        metadata={
            "help": "adaswitch: A, absolute trigger: also switch as soon as the divergence exceeds A, warm-up "
            "included, whatever the moving average says (inf = off)."
        },
    )
    switch_position: int | None = field(
        default=None,
        metadata={"help": "fixed_switch: the response position of the switch (default: the warm-up max(L, W))."},
    )
    switch_positions: list[int] | None = field(
        default=None,
        metadata={
            "help": "random_switch: candidate switch positions (-1 = never), e.g. AdaSwitch's observed ones; "
            "required by random_switch."
        },
    )
    switch_weights: list[float] | None = field(
        default=None,
        metadata={"help": "random_switch: one weight per switch position (default: uniform)."},
    )
    switch_temperature: float = field(
        default=1.0,
        metadata={
            "help": "adaswitch: temperature of the distributions compared by the switching divergence."
        },
    )

    # ---- sampling ----------------------------------------------------------------------------------
    student_temperature: float = field(
        default=1.0, metadata={"help": "Student sampling temperature (0 = greedy)."}
    )
    student_top_k: int = field(default=0, metadata={"help": "Student top-k filter (0 = off)."})
    student_top_p: float = field(default=1.0, metadata={"help": "Student nucleus filter (1.0 = off)."})
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "Teacher sampling temperature (0 = greedy)."}
    )
    teacher_top_k: int = field(default=0, metadata={"help": "Teacher top-k filter (0 = off)."})
    teacher_top_p: float = field(default=1.0, metadata={"help": "Teacher nucleus filter (1.0 = off)."})
    max_new_tokens: int = field(
        default=128, metadata={"help": "Maximum number of generated response tokens."}
    )
    lookahead: int | None = field(
        default=None,
        metadata={
            "help": "Lookahead G: the student drafts G tokens which the teacher scores in one forward (adaswitch "
            "and its controls, skd; teacher with speculative guidance); 0 = token by token. Same tokens as "
            f"token by token. Default: {SKD_DEFAULT_LOOKAHEAD} for skd, 0 for the other policies (the fastest "
            "settings of the step-cost benchmark)."
        },
    )
    guidance: str = field(
        default="step",
        metadata={
            "help": "How the teacher writes its tokens (adaswitch and its controls after the switch, teacher): "
            "'step', one token per teacher forward; 'speculative', the teacher verifies the student's drafts, "
            "up to `lookahead` + 1 teacher tokens per forward, each distributed as the teacher's own draw "
            "(greedy teachers: the same tokens). 'speculative' needs lookahead >= 1.",
            "choices": ("step", "speculative"),
        },
    )
    reuse_teacher_states: bool = field(
        default=True,
        metadata={
            "help": "Feed the loss the teacher's hidden states from generation instead of a second teacher "
            "forward, when the teacher ran on every loss position and the fused LM-head loss applies."
        },
    )
    sync_every: int | None = field(
        default=None,
        metadata={"help": "Decode steps between checks of the all-rows-finished flag (host syncs). Default: 16 "
                  "on an accelerator, 1 on the CPU (where a check costs nothing)."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Longest prompt in tokens; longer prompts are an error naming the row. Default: the "
            "models' context length minus max_new_tokens."
        },
    )

    # ---- loss --------------------------------------------------------------------------------------
    loss_kind: str = field(
        default="forward_kl",
        metadata={
            "help": "Divergence minimised between teacher and student on the response tokens, or "
            "sampled_reverse_kl: the reverse KL estimated on each sampled token, as a policy-gradient loss.",
            "choices": LOSS_KINDS,
        },
    )
    beta: float = field(
        default=0.5,
        metadata={
            "help": "JSD weight in [0, 1] (TRL convention: 0 = forward KL, 1 = reverse KL); also used by a "
            "jsd switching divergence."
        },
    )
    alpha: float = field(
        default=0.1,
        metadata={"help": "Skew weight in [0, 1] of skew_forward_kl / skew_reverse_kl (loss and switching)."},
    )
    loss_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of both distributions in the loss (> 0)."}
    )
    token_mask: str = field(
        default="all",
        metadata={
            "help": "Which response tokens the loss covers: all of them, only those the student sampled, "
            "or only those the teacher sampled.",
            "choices": TOKEN_MASKS,
        },
    )
    loss_reduction: str = field(
        default="mean",
        metadata={
            "help": "mean: over the loss tokens of the batch; sequence_mean: each sequence's summed loss, averaged "
            "over the sequences (TRL's batchmean without labels; long answers weigh more).",
            "choices": LOSS_REDUCTIONS,
        },
    )
    weight_hard_loss: float = field(
        default=0.0,
        metadata={
            "help": "Weight (>= 0) of a hard-label term: the cross-entropy of the response tokens under the "
            "student's raw logits (Liger's weight_hard_loss; 0 = none)."
        },
    )
    weight_soft_loss: float = field(
        default=1.0, metadata={"help": "Weight (>= 0) of the distillation term (Liger's weight_soft_loss)."}
    )
    hard_label_mask: str = field(
        default="all",
        metadata={
            "help": "Which of the loss tokens the hard-label term covers: all, those the student sampled, or "
            "those the teacher wrote.",
            "choices": TOKEN_MASKS,
        },
    )
    sampled_discount: float = field(
        default=0.0,
        metadata={"help": "sampled_reverse_kl: discount in [0, 1] of later tokens' estimates (0 = per token)."},
    )
    sampled_importance_cap: float = field(
        default=DEFAULT_IMPORTANCE_CAP,
        metadata={
            "help": "sampled_reverse_kl: cap (> 0) of the importance weight p_S / p_T of a teacher-written token."
        },
    )

    # ---- TrainingArguments defaults that differ ------------------------------------------------------
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: the distiller needs the prompt/completion columns the model does not take."
        },
    )

    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "Kept False: a NaN or inf loss is logged as it is and stops the run (adaswitch.train.finite); "
            "transformers' True would log the running average in its place."
        },
    )

    def __post_init__(self):
        self._check()
        if not self.use_cpu and launched_processes() > 1 and not accelerator_available():
            # Without use_cpu, transformers resolves a machine with no accelerator to "not distributed": every
            # process torchrun launched would train alone on the whole dataset and write the same
            # output_dir. On such a machine the CPU is the only device, so this changes nothing else.
            self.use_cpu = True
        super().__post_init__()

    def _check(self) -> None:
        """Every error names the field and what was expected, before accelerate or any model is touched. The
        policy's parameters are checked by the policy itself (`build_policy`, messages in these field names);
        a parameter of another policy set to anything but its default is an error, not silently ignored."""
        if self.policy not in POLICY_NAMES:
            raise ValueError(f"policy must be one of {POLICY_NAMES}, got {self.policy!r}")
        self._check_policy_parameters()
        for name in ("max_new_tokens", "sync_every"):
            value = getattr(self, name)
            if name == "sync_every" and value is None:
                continue
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.lookahead is None:  # the fastest setting by policy (SKD_DEFAULT_LOOKAHEAD), within the budget
            self.lookahead = min(SKD_DEFAULT_LOOKAHEAD, self.max_new_tokens) if self.policy == "skd" else 0
        if not _is_int(self.lookahead) or self.lookahead < 0:
            raise ValueError(f"lookahead must be an int >= 0 (0 = token by token), got {self.lookahead!r}")
        if self.lookahead > self.max_new_tokens:
            raise ValueError(
                f"lookahead must be <= max_new_tokens ({self.max_new_tokens}): a block drafts G tokens of a "
                f"response that holds at most max_new_tokens (more only costs forwards), got {self.lookahead}"
            )
        self.build_policy()  # the policy checks its own parameters
        if self.guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {GUIDANCES}, got {self.guidance!r}")
        if self.guidance == "speculative":
            if self.policy not in (*SWITCH_POLICIES, "teacher"):
                raise ValueError(
                    f"guidance='speculative' applies to policies {SWITCH_POLICIES} and 'teacher', got "
                    f"policy={self.policy!r} (skd's lookahead already scores G drafts per teacher forward)"
                )
            if self.lookahead < 1:
                raise ValueError("guidance='speculative' drafts `lookahead` tokens per teacher forward: "
                                 "set lookahead >= 1")
        if not isinstance(self.reuse_teacher_states, bool):
            raise ValueError(f"reuse_teacher_states must be a bool, got {self.reuse_teacher_states!r}")
        guided_teacher = self.policy == "teacher" and self.guidance == "speculative"
        if self.lookahead and self.policy not in (*SWITCH_POLICIES, "skd") and not guided_teacher:
            raise ValueError(
                f"lookahead applies to policies {SWITCH_POLICIES} and 'skd', got lookahead={self.lookahead} with "
                f"policy={self.policy!r}"
            )
        if self.max_prompt_length is not None and (
            not _is_int(self.max_prompt_length) or self.max_prompt_length < 1
        ):
            raise ValueError(f"max_prompt_length must be None or an int >= 1, got {self.max_prompt_length!r}")
        self._check_loss()
        check_training_arguments(self)

    def _check_policy_parameters(self) -> None:
        """A parameter set (to other than its default) for a policy that does not take it is an error: it would
        change nothing, silently."""
        defaults = {f.name: f.default for f in fields(DistillConfig) if f.name in POLICY_PARAMETERS}
        for name, users in POLICY_PARAMETERS.items():
            value = getattr(self, name)
            if self.policy in users or value == defaults[name]:
                continue
            used_by = f"policy {users[0]!r}" if len(users) == 1 else f"policies {', '.join(map(repr, users))}"
            raise ValueError(
                f"{name} applies to {used_by}, not {self.policy!r} (got {name}={value!r}): it would change "
                "nothing; remove it or choose a policy that takes it"
            )

    def _check_loss(self) -> None:
        if self.loss_kind not in LOSS_KINDS:
            raise ValueError(f"loss_kind must be one of {LOSS_KINDS}, got {self.loss_kind!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        for name in ("weight_hard_loss", "weight_soft_loss"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.weight_hard_loss == 0 and self.weight_soft_loss == 0:
            raise ValueError("weight_hard_loss and weight_soft_loss are both 0: the loss would be 0; set one > 0")
        if self.hard_label_mask not in TOKEN_MASKS:
            raise ValueError(f"hard_label_mask must be one of {TOKEN_MASKS}, got {self.hard_label_mask!r}")
        if self.hard_label_mask != "all" and self.weight_hard_loss == 0:
            raise ValueError(f"hard_label_mask={self.hard_label_mask!r} selects the hard-label term's tokens: set "
                             "weight_hard_loss > 0 to use it")
        if not _is_number(self.sampled_discount) or not 0.0 <= self.sampled_discount <= 1.0:
            raise ValueError(f"sampled_discount must be a number in [0, 1], got {self.sampled_discount!r}")
        cap = self.sampled_importance_cap
        if not _is_number(cap) or not math.isfinite(cap) or cap <= 0:
            raise ValueError(f"sampled_importance_cap must be a finite number > 0, got {cap!r}")
        if self.loss_kind != SAMPLED_KIND and (self.sampled_discount != 0.0 or cap != DEFAULT_IMPORTANCE_CAP):
            raise ValueError(f"sampled_discount and sampled_importance_cap apply to loss_kind={SAMPLED_KIND!r}, "
                             f"got loss_kind={self.loss_kind!r}: they would change nothing")
        if self.loss_kind == SAMPLED_KIND and self.policy == "dataset":
            raise ValueError(f"loss_kind={SAMPLED_KIND!r} estimates the reverse KL on tokens a model sampled; "
                             "policy 'dataset' tokens come from neither model (no importance weight is known)")
        value = self.loss_temperature
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"loss_temperature must be a finite number > 0, got {value!r}")
        for name in ("beta", "alpha"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.token_mask not in TOKEN_MASKS:
            raise ValueError(f"token_mask must be one of {TOKEN_MASKS}, got {self.token_mask!r}")
        if self.token_mask != "all" and self.policy == "dataset":
            raise ValueError(
                "token_mask must be 'all' with policy 'dataset' (dataset tokens are sampled by neither "
                f"model), got {self.token_mask!r}"
            )
        never = {"student": ("teacher",), "teacher": ("student", "mixed")}.get(self.token_mask, ())
        if self.policy in never:
            raise ValueError(
                f"token_mask={self.token_mask!r} selects no tokens with policy {self.policy!r} (the "
                f"{self.token_mask} never samples there); use 'all' or another policy"
            )
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns must be False for distillation: the prompt and completion "
                "columns are not arguments of the model's forward"
            )
        if self.logging_nan_inf_filter:
            raise ValueError(
                "logging_nan_inf_filter must be False: a NaN or inf loss stops the run with an error instead of "
                "being logged as the running average"
            )

    @property
    def uses_completions(self) -> bool:
        """Whether the policy reads the dataset's `completion` column."""
        return self.policy in POLICIES_USING_COMPLETIONS

    def build_policy(self):
        """The engine policy object (adaswitch.Student, ..., adaswitch.AdaSwitch) for this config; the policy
        checks its parameters, and an error names the DistillConfig field (e.g. switch_temperature for
        AdaSwitch's divergence_temperature).

        Returns None for `policy="dataset"`, which generates nothing: the responses are the dataset's.
        """
        from adaswitch.policies import (
            SKD,
            AdaSwitch,
            FixedSwitch,
            Mixed,
            RandomSwitch,
            Sampling,
            Student,
            Teacher,
        )

        def sampling(side):
            names = {a: f"{side}_{a}" for a in ("temperature", "top_k", "top_p")}
            return _named(Sampling, names, *(getattr(self, n) for n in names.values()))

        if self.policy == "dataset":
            return None
        if self.policy == "student":
            return Student(sampling=sampling("student"))
        if self.policy == "teacher":
            return Teacher(sampling=sampling("teacher"))
        if self.policy == "mixed":
            return _named(Mixed, {}, lmbda=_float(self.lmbda), sampling=sampling("student"))
        if self.policy == "skd":
            return _named(SKD, {"top_k": "skd_top_k"}, top_k=self.skd_top_k, student_sampling=sampling("student"),
                          teacher_sampling=sampling("teacher"))
        common = dict(
            window=self.window,
            k=_float(self.k),
            divergence=self.switch_divergence,
            warmup=self.warmup,
            min_divergence=_float(self.min_divergence),
            max_divergence=_float(self.max_divergence),
            divergence_temperature=_float(self.switch_temperature),
            beta=_float(self.beta),
            alpha=_float(self.alpha),
            student_sampling=sampling("student"),
            teacher_sampling=sampling("teacher"),
        )
        names = {"divergence": "switch_divergence", "divergence_temperature": "switch_temperature"}
        if self.policy == "fixed_switch":
            return _named(FixedSwitch, {**names, "position": "switch_position"}, position=self.switch_position,
                          **common)
        if self.policy == "random_switch":
            if not self.switch_positions:
                raise ValueError("switch_positions is required by policy 'random_switch' (e.g. AdaSwitch's observed "
                                 "switch positions; -1 = never)")
            weights = self.switch_weights
            weights = tuple(_float(w) for w in weights) if isinstance(weights, (list, tuple)) else weights
            positions = self.switch_positions
            positions = tuple(positions) if isinstance(positions, (list, tuple)) else positions
            return _named(RandomSwitch, {**names, "positions": "switch_positions", "weights": "switch_weights"},
                          positions=positions, weights=weights, **common)
        return _named(AdaSwitch, names, **common)


def _float(value):
    """A number as a float (the policies store floats); anything else as it is, for the policy to refuse."""
    return float(value) if _is_number(value) else value


def _named(cls, names: dict, *args, **kwargs):
    """cls(*args, **kwargs), an error's leading argument name replaced by the DistillConfig field's (`names`:
    the policy's argument -> the field)."""
    try:
        return cls(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        head, _, rest = text.partition(" ")
        if head in names:
            raise type(exc)(f"{names[head]} {rest}") from None
        raise


def _check_range(args, name: str, *, low, high=math.inf, integer=False, low_open=False, high_open=False,
                 none_ok=False, note: str = "") -> None:
    value = getattr(args, name)
    if value is None and none_ok:
        return
    ok = (_is_int(value) if integer else _is_number(value) and not math.isnan(value))
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        kind = "an int" if integer else "a finite number" if high == math.inf and high_open else "a number"
        top = high if integer else format(high, "g")
        bounds = f"{'>' if low_open else '>='} {low:g}" if high == math.inf else (
            f"in {'(' if low_open else '['}{low:g}, {top}{')' if high_open else ']'}")
        also = " or None" if none_ok else ""
        raise ValueError(f"{name} must be {kind} {bounds}{also}{note}, got {value!r}")


def check_training_arguments(args) -> None:
    """The TrainingArguments fields a distillation run reads, checked before transformers, accelerate or any
    model sees them (transformers would fail later, in torch's words, or not at all: a ZeroDivisionError for
    gradient_accumulation_steps=0, a silent NaN run for learning_rate=nan)."""
    _check_range(args, "learning_rate", low=0, high=math.inf, high_open=True)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _check_range(args, name, low=1, integer=True)
    _check_range(args, "max_grad_norm", low=0, high=math.inf, high_open=True, note=" (0 = no clipping)")
    if not _is_int(args.max_steps) or (args.max_steps < 1 and args.max_steps != -1):
        raise ValueError(
            f"max_steps must be an int >= 1, or -1 (the default: train num_train_epochs), got {args.max_steps!r}"
        )
    if args.max_steps == -1:
        _check_range(args, "num_train_epochs", low=0, low_open=True, high=math.inf, high_open=True)
    for name in ("logging_steps", "save_steps", "eval_steps"):
        _check_range(args, name, low=0, low_open=True, high=math.inf, high_open=True, none_ok=name == "eval_steps",
                     note=" (< 1: a fraction of the run's steps)")
        value = getattr(args, name)
        if value is not None and value > 1 and value != int(value):
            raise ValueError(f"{name} must be an int, or a fraction of the run's steps in (0, 1), got {value!r}")
    _check_range(args, "save_total_limit", low=1, integer=True, none_ok=True, note=" (None = keep every checkpoint)")
    _check_range(args, "seed", low=0, high=2**32 - 1, integer=True)
    _check_range(args, "data_seed", low=0, high=2**32 - 1, integer=True, none_ok=True)
    _check_range(args, "warmup_steps", low=0, high=math.inf, high_open=True)
    _check_range(args, "weight_decay", low=0, high=math.inf, high_open=True)
    for name in ("adam_beta1", "adam_beta2"):
        _check_range(args, name, low=0, high=1, high_open=True)
    _check_range(args, "adam_epsilon", low=0, high=math.inf, high_open=True)
