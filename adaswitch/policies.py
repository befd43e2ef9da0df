"""Generation policies (docs/spec.md section 2): small frozen config dataclasses, validated on construction.

A policy says, per row and response position, which model's distribution the next token is drawn
from. `code` is the integer the fused step kernel switches on; `student_sampling`/`teacher_sampling`
are the per-model sampling settings the step op uses (policies with one model map their `sampling`
to the side they run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adaswitch._validation import KINDS, is_int, is_number


def _check_sampling(name: str, value) -> None:
    if not isinstance(value, Sampling):
        raise TypeError(f"{name} must be an adaswitch.Sampling, got {type(value).__name__}")


@dataclass(frozen=True)
class Sampling:
    """How one model's next token is drawn.

    Args:
        temperature: divides the logits before sampling; 0 means greedy (argmax, ties to the lowest id).
        top_k: keep only the `top_k` largest logits (ties at the boundary are all kept); 0 turns it off.
        top_p: nucleus sampling on the temperature-scaled distribution (after top_k): keep the smallest
            set of highest-probability tokens whose cumulative probability is >= top_p (ties at the
            boundary are all kept); 1.0 turns it off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t = self.temperature
        if not is_number(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1] (1.0 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """True when top_k or top_p restrict the candidates (never for greedy decoding)."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


@dataclass(frozen=True)
class Student:
    """On-policy KD (GKD lambda = 1): every response token is drawn from the student.

    Args:
        sampling: the student's sampling settings.
    """

    sampling: Sampling = field(default_factory=Sampling)
    code = 0

    def __post_init__(self):
        _check_sampling("sampling", self.sampling)

    student_sampling = property(lambda self: self.sampling)
    teacher_sampling = property(lambda self: Sampling())
    uses_student = property(lambda self: True)
    uses_teacher = property(lambda self: False)


@dataclass(frozen=True)
class Teacher:
    """Sequence-level KD (SeqKD data): every response token is drawn from the teacher.

    Args:
        sampling: the teacher's sampling settings.
    """

    sampling: Sampling = field(default_factory=Sampling)
    code = 1

    def __post_init__(self):
        _check_sampling("sampling", self.sampling)

    student_sampling = property(lambda self: Sampling())
    teacher_sampling = property(lambda self: self.sampling)
    uses_student = property(lambda self: False)
    uses_teacher = property(lambda self: True)


@dataclass(frozen=True)
class Mixed:
    """GKD lambda / ImitKD: per sequence, with probability `lmbda` the student generates the response,
    else the dataset's completion is used. The coin is `adaswitch.ops.rng.mixed_coin` (stream 2 of
    the example key), so it does not depend on batch composition.

    Args:
        lmbda: probability of the student-generated response, in [0, 1].
        sampling: the student's sampling settings.
    """

    lmbda: float = 0.5
    sampling: Sampling = field(default_factory=Sampling)
    code = 2

    def __post_init__(self):
        if not is_number(self.lmbda) or not (0.0 <= self.lmbda <= 1.0):
            raise ValueError(f"lmbda must be a number in [0, 1], got {self.lmbda!r}")
        _check_sampling("sampling", self.sampling)

    student_sampling = property(lambda self: self.sampling)
    teacher_sampling = property(lambda self: Sampling())
    uses_student = property(lambda self: True)
    uses_teacher = property(lambda self: False)


@dataclass(frozen=True)
class SKD:
    """Speculative KD: at every position the student drafts y ~ p_S; y is kept if it is among the
    teacher's `top_k` logits (ties to the lower id), else replaced by a fresh draw y ~ p_T.

    Args:
        top_k: size of the teacher's acceptance set; 0 means every token comes from the teacher, a value
            >= the vocabulary size means every token comes from the student.
        student_sampling: the student's (drafting) sampling settings.
        teacher_sampling: the teacher's (replacement) sampling settings.
    """

    top_k: int = 25
    student_sampling: Sampling = field(default_factory=Sampling)
    teacher_sampling: Sampling = field(default_factory=Sampling)
    code = 3

    def __post_init__(self):
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        _check_sampling("student_sampling", self.student_sampling)
        _check_sampling("teacher_sampling", self.teacher_sampling)

    uses_student = property(lambda self: True)
    uses_teacher = property(lambda self: True)


@dataclass(frozen=True)
class AdaSwitch:
    """Adaptive switching (docs/spec.md section 2.1): the student generates while its divergence from the teacher
    stays below `k` times its moving average; at the first spike the teacher generates the rest.

    At exploration position i with divergence d_i, the row switches when (1) it holds >= max(L, W)
    earlier divergences, d_i > K x their mean and d_i >= F (relative trigger), or (2) d_i > A
    (absolute trigger), or (3) d_i = +inf (e.g. the student gives zero probability to a token the
    teacher supports: it exceeds every level; it never enters the window, where it would hide every
    spike for L positions). A NaN d_i (NaN or +inf logits, an all -inf row) carries no information: the
    row keeps exploring and d_i neither enters the window nor counts toward the warm-up.

    Args:
        window: L, how many earlier divergences the moving average covers (>= 1).
        k: K, the spike factor (> 0); `math.inf` never switches (the Student policy's tokens).
        divergence: the divergence kind D between p_T and p_S (docs/spec.md section 1).
        warmup: W, a row may switch once it holds at least max(L, W) earlier divergences; None means W = L.
        min_divergence: F, a spike must also reach d_i >= F (>= 0).
        max_divergence: A, the absolute trigger: a row also switches as soon as d_i > A, at any
            exploration position (warm-up included), whatever the moving mean says; `math.inf` (the
            default) turns it off. For a student that is far from the teacher from the first token
            on, whose divergence never spikes relative to its own mean.
        divergence_temperature: temperature of p_T and p_S in d_i (independent of sampling temperature).
        beta: JSD weight (used when divergence == "jsd").
        alpha: skew weight (used by the skewed KLs).
        student_sampling: the student's sampling settings.
        teacher_sampling: the teacher's sampling settings (after the switch).
    """

    window: int = 8  # defaults: chosen by the window x K ablation on the demo task (docs/ablation.md)
    k: float = 1.5
    divergence: str = "forward_kl"
    warmup: int | None = None
    min_divergence: float = 0.0
    max_divergence: float = math.inf
    divergence_temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    student_sampling: Sampling = field(default_factory=Sampling)
    teacher_sampling: Sampling = field(default_factory=Sampling)
    code = 4

    def __post_init__(self):
        if not is_int(self.window) or self.window < 1:
            raise ValueError(f"window must be an int >= 1, got {self.window!r}")
        if not is_number(self.k) or math.isnan(self.k) or self.k <= 0:
            raise ValueError(f"k must be a number > 0 (inf = never switch), got {self.k!r}")
        if self.divergence not in KINDS:
            raise ValueError(f"divergence must be one of {KINDS}, got {self.divergence!r}")
        if self.warmup is not None and (not is_int(self.warmup) or self.warmup < 0):
            raise ValueError(f"warmup must be None or an int >= 0, got {self.warmup!r}")
        f = self.min_divergence
        if not is_number(f) or not math.isfinite(f) or f < 0:
            raise ValueError(f"min_divergence must be a finite number >= 0, got {f!r}")
        a = self.max_divergence
        if not is_number(a) or math.isnan(a) or a < 0:
            raise ValueError(f"max_divergence must be a number >= 0 (inf = off), got {a!r}")
        t = self.divergence_temperature
        if not is_number(t) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"divergence_temperature must be a finite number > 0, got {t!r}")
        for name in ("beta", "alpha"):
            v = getattr(self, name)
            if not is_number(v) or not (0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        _check_sampling("student_sampling", self.student_sampling)
        _check_sampling("teacher_sampling", self.teacher_sampling)

    @property
    def min_history(self) -> int:
        """max(L, W): how many earlier divergences a row needs before it may switch."""
        return max(self.window, self.window if self.warmup is None else self.warmup)

    uses_student = property(lambda self: True)
    uses_teacher = property(lambda self: True)


# "never switches" in a scheduled policy's per-row switch position (SwitchState.switch_at)
NEVER = 1 << 62


def _check_schedule_fields(policy) -> None:
    """The fields of AdaSwitch a scheduled control keeps must still be valid (window, sampling, ...)."""
    AdaSwitch.__post_init__(policy)


@dataclass(frozen=True, init=False)
class FixedSwitch(AdaSwitch):
    """Control for AdaSwitch without the divergence test: the student writes the first `position`
    response tokens, the teacher the rest. Everything else is AdaSwitch's (the divergence is still
    computed and reported at the student's positions; k, min_divergence and max_divergence are not
    used).

    Args:
        position: the response position of the switch; None means the warm-up, max(L, W), AdaSwitch's
            earliest possible switch. The only positional argument (`FixedSwitch(12)`).
        other arguments: as AdaSwitch, by keyword.
    """

    position: int | None = None

    def __init__(self, position: int | None = None, **adaswitch):
        # by hand, so that the first positional argument is the position, not AdaSwitch's window
        object.__setattr__(self, "position", position)
        AdaSwitch.__init__(self, **adaswitch)  # sets AdaSwitch's fields, then runs __post_init__ below

    def __post_init__(self):
        _check_schedule_fields(self)
        if self.position is not None and (not is_int(self.position) or self.position < 0):
            raise ValueError(f"position must be None (the warm-up) or an int >= 0, got {self.position!r}")

    @property
    def switch_position(self) -> int:
        return self.min_history if self.position is None else self.position

    def switch_at(self, seed: int, keys):
        """int64 [B]: every row's switch position."""
        import torch

        return torch.full_like(keys, self.switch_position, dtype=torch.int64)


@dataclass(frozen=True, init=False)
class RandomSwitch(AdaSwitch):
    """Control for AdaSwitch without the divergence test: each row switches at a position drawn from
    `positions` (with probabilities proportional to `weights`, default uniform), e.g. AdaSwitch's own
    observed switch positions, so that it matches AdaSwitch's teacher-token share. -1 in `positions`
    means the row never switches. The draw is counter-based (adaswitch.ops.rng.switch_draw: seed and
    example key, stream 4), so a row's position does not depend on its batch. Everything else is
    AdaSwitch's (k, min_divergence and max_divergence are not used).

    Args:
        positions: the candidate switch positions (ints >= -1; -1 = never), at least one.
        weights: None (uniform) or one number >= 0 per position, not all 0.
        other arguments: as AdaSwitch, by keyword (`RandomSwitch((1, 2), (1, 1))` is positions and weights).
    """

    positions: tuple = (8,)
    weights: tuple | None = None

    def __init__(self, positions: tuple = (8,), weights: tuple | None = None, **adaswitch):
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "weights", weights)
        AdaSwitch.__init__(self, **adaswitch)

    def __post_init__(self):
        _check_schedule_fields(self)
        pos = self.positions
        if not isinstance(pos, tuple) or not pos or any(not is_int(p) or p < -1 for p in pos):
            raise ValueError(f"positions must be a non-empty tuple of ints >= -1 (-1 = never), got {pos!r}")
        w = self.weights
        if w is not None:
            if (not isinstance(w, tuple) or len(w) != len(pos)
                    or any(not is_number(x) or not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0):
                raise ValueError(f"weights must be None or {len(pos)} finite numbers >= 0, not all 0, got {w!r}")

    def switch_at(self, seed: int, keys):
        """int64 [B]: every row's drawn switch position (NEVER for -1), a pure function of (seed, key)."""
        import torch

        from adaswitch.ops import rng

        weights = torch.tensor(self.weights or (1.0,) * len(self.positions), dtype=torch.float64)
        cdf = (weights.cumsum(0) / weights.sum()).to(keys.device)
        table = torch.tensor([NEVER if p < 0 else p for p in self.positions], dtype=torch.int64,
                             device=keys.device)
        u = rng.switch_draw(seed, keys).double()
        index = torch.searchsorted(cdf, u, right=True).clamp_(max=len(self.positions) - 1)
        return table[index]


SCHEDULED = (FixedSwitch, RandomSwitch)
POLICIES = (Student, Teacher, Mixed, SKD, AdaSwitch)
Policy = Student | Teacher | Mixed | SKD | AdaSwitch


def check_policy(policy) -> None:
    if not isinstance(policy, POLICIES):
        names = ", ".join(p.__name__ for p in POLICIES)
        raise TypeError(f"policy must be one of adaswitch.{{{names}}}, got {type(policy).__name__}")
