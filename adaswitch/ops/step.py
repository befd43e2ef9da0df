"""The fused per-token step of the mixed decoding engine: one call per generated position decides, on the
device, every row's next token under a generation policy (docs/spec.md sections 2-4) and updates the rows'
switching state. `fused_lookahead` does the same for G drafted positions at once (lookahead mode).

Dispatch: the Triton kernel (kernels/triton/step.py), the native CPU path (the divergence by the
token_divergence op, then every draw, SKD's rank test, the switching rule and the state updates in one
call of the C++ op step_decide / lookahead_decide, kernels/csrc/step.cpp) or this file's PyTorch
reference; all draw with the counter-based RNG of adaswitch.ops.rng, so they give the same tokens, and
the native rule takes its window sums from torch's own sum, as the reference, so it decides bit for bit
as the reference.
No host sync anywhere here: every decision is a tensor operation (or the native op's loop over rows),
Python branches only on the policy (a config, not data).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from adaswitch import reference
from adaswitch._backend import native_ops, resolve_impl
from adaswitch._validation import FLOAT_DTYPES, check_divergence_args
from adaswitch.ops import rng
from adaswitch.policies import SCHEDULED, SKD, AdaSwitch, Mixed, Student, Teacher, check_policy


@dataclass
class SwitchState:
    """Per-row decoding state, updated in place by `fused_step` / `fused_lookahead`.

    window: float32 [B, L] ring of the row's most recent exploration divergences (slot count % L next);
    count: int64 [B] divergences pushed so far; switched: bool [B]; switch_pos: int64 [B] response
    position of the switch (-1 if none); finished: bool [B] (the row has emitted EOS); switch_at: int64
    [B], the scheduled controls' (FixedSwitch, RandomSwitch) switch position per row, set from the
    policy, seed and keys by the first step (None until then, and for every other policy).
    """

    window: torch.Tensor
    count: torch.Tensor
    switched: torch.Tensor
    switch_pos: torch.Tensor
    finished: torch.Tensor
    switch_at: torch.Tensor | None = None

    @classmethod
    def new(cls, batch: int, window: int = 1, device: torch.device | str | None = None) -> SwitchState:
        """Fresh state for `batch` rows; `window` must equal the AdaSwitch policy's L (any >= 1 otherwise)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        return cls(
            window=torch.zeros(batch, window, dtype=torch.float32, device=device),
            count=torch.zeros(batch, dtype=torch.int64, device=device),
            switched=torch.zeros(batch, dtype=torch.bool, device=device),
            switch_pos=torch.full((batch,), -1, dtype=torch.int64, device=device),
            finished=torch.zeros(batch, dtype=torch.bool, device=device),
        )

    @property
    def batch(self) -> int:
        return self.count.shape[0]


@dataclass
class StepOutput:
    """token int64 [B] (pad for rows already finished); from_teacher bool [B]; divergence float32 [B]
    (d_i at AdaSwitch exploration positions, including the switch position; NaN elsewhere)."""

    token: torch.Tensor
    from_teacher: torch.Tensor
    divergence: torch.Tensor


@dataclass
class LookaheadOutput:
    """accepted int64 [B]: leading drafts kept; token int64 [B]: the token at index `accepted` (the
    teacher's draw where a row switched or a draft was rejected, else pad); from_teacher bool [B]: token
    is a teacher draw; divergence float32 [B, G] (NaN where not an exploration position)."""

    accepted: torch.Tensor
    token: torch.Tensor
    from_teacher: torch.Tensor
    divergence: torch.Tensor


# ----------------------------------------------------------------------------------------------- checks

NO_EOS = -1  # eos_token_id for "no EOS token": rows never finish

def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value


def _check_rows(name: str, x, shape: tuple, device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def _check_logits(name: str, x, lead: tuple, vocab, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != len(lead) + 1 or tuple(x.shape[:-1]) != lead or x.shape[-1] < 1:
        raise ValueError(f"{name} must have shape {(*lead, 'V')} with V >= 1, got {tuple(x.shape)}")
    if vocab is not None and x.shape[-1] != vocab:
        raise ValueError(f"student_logits and teacher_logits must have the same vocabulary size, got "
                         f"{vocab} and {x.shape[-1]}")
    if device is not None and x.device != device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got {device} and "
                         f"{x.device}")


def _check_inputs(student_logits, teacher_logits, policy, state, keys, position, lead, seed, eos, pad):
    check_policy(policy)
    if not isinstance(state, SwitchState):
        raise TypeError(f"state must be a SwitchState, got {type(state).__name__}")
    rng.check_seed(seed)
    _check_int("eos_token_id", eos)
    _check_int("pad_token_id", pad)
    needs_student = isinstance(policy, (Student, Mixed, SKD))
    needs_teacher = isinstance(policy, (Teacher, SKD, AdaSwitch))
    if needs_student and student_logits is None:
        raise ValueError(f"student_logits are required by the {type(policy).__name__} policy")
    if needs_teacher and teacher_logits is None:
        raise ValueError(f"teacher_logits are required by the {type(policy).__name__} policy")
    vocab = device = None
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x is not None:
            _check_logits(name, x, lead, vocab, device)
            vocab, device = x.shape[-1], x.device
    if not (0 <= eos < vocab or eos == NO_EOS):
        raise ValueError(f"eos_token_id must be a token id in [0, {vocab}) (the logits' vocabulary) or {NO_EOS} "
                         f"(no EOS), got {eos}")
    if not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}) (the logits' vocabulary), got {pad}")
    batch = lead[0]
    _check_rows("keys", keys, (batch,), device)
    _check_rows("position", position, (batch,), device)
    if state.batch != batch or state.count.device != device:
        raise ValueError(f"state must hold {batch} rows on {device}, got {state.batch} rows on "
                         f"{state.count.device}")
    if isinstance(policy, AdaSwitch) and state.window.shape[1] != policy.window:
        raise ValueError(f"state.window must have policy.window = {policy.window} columns, got "
                         f"{state.window.shape[1]} (create it with SwitchState.new(batch, policy.window))")
    return device


def _impl(impl, device) -> str:
    """"triton", "native" (the C++ ops of kernels/csrc/step.cpp, the divergence by token_divergence's
    native op) or "torch"."""
    return resolve_impl(impl, device, native_op="gumbel_argmax")


@functools.cache
def _has_native(name: str) -> bool:
    """Whether the loaded native module (adaswitch._C_<capability>) has op `name` (cached: an attribute probe
    costs a few us per call)."""
    return native_ops() is not None and hasattr(native_ops(), name)


# ------------------------------------------------------------------------------------- shared pieces

def _draw(logits, sampling, seed, keys, positions, stream, native=False, rows=None):
    """Gumbel-max draws [B]. The native op skips rows where `rows` (bool [B]) is False (their token is
    then meaningless: callers discard it); the reference (rng.sample) draws every row."""
    if not native:
        return rng.sample(logits, sampling, seed=seed, keys=keys, positions=positions, stream=stream)
    inv = 1.0 if sampling.greedy else 1.0 / sampling.temperature
    return native_ops().gumbel_argmax(logits, keys, positions, rng.seed_hash(seed), stream, inv,
                                      rng.sampling_threshold(logits, sampling), sampling.greedy, rows)


# the rank of a token outside the vocabulary: SKD rejects it whatever its top_k (the Triton kernel's too)
OUT_OF_VOCAB_RANK = 1 << 62


def _teacher_rank(teacher_logits, token, native=False):
    """Rank of `token` among the teacher's logits, ties to the lower id (0 = the teacher's argmax); a
    token outside [0, V) gets OUT_OF_VOCAB_RANK (checked on the device, no host sync)."""
    vocab = teacher_logits.shape[-1]
    in_vocab = (token >= 0) & (token < vocab)
    safe = torch.where(in_vocab, token, torch.zeros_like(token))
    if native and hasattr(native_ops(), "logit_rank"):
        rank = native_ops().logit_rank(teacher_logits, safe)
    else:
        t = teacher_logits.float()
        ty = t.gather(-1, safe[:, None])
        ids = torch.arange(vocab, device=t.device)
        rank = ((t > ty) | ((t == ty) & (ids < safe[:, None]))).sum(-1)
    return torch.where(in_vocab, rank, torch.full_like(rank, OUT_OF_VOCAB_RANK))


def _divergence(student_logits, teacher_logits, policy: AdaSwitch, native=False):
    """The rule's divergence per row, >= 0 as token_divergence returns it (rounding leaves about -1e-7 for
    equal inputs, which a floor F = 0 would treat unlike KL; NaN stays NaN): the native op and the Triton
    kernel clamp it themselves (no PyTorch op around the native step), the reference here."""
    if native and _has_native("token_divergence"):
        # token_divergence(impl="native")'s call without its argument checks (the policy's fields and the
        # logits are already checked): the same op on the same arguments
        s, t = student_logits, teacher_logits
        if s.dtype != t.dtype:
            common = torch.promote_types(s.dtype, t.dtype)
            s, t = s.to(common), t.to(common)
        if s.dim() != 2:
            lead, vocab = s.shape[:-1], s.shape[-1]
            return _divergence(s.reshape(-1, vocab), t.reshape(-1, vocab), policy, native).reshape(lead)
        return native_ops().token_divergence(s.contiguous(), t.contiguous(), *_native_constants(policy).divergence)
    return reference.divergence_rows(student_logits, teacher_logits, policy.divergence, beta=policy.beta,
                                     alpha=policy.alpha, temperature=policy.divergence_temperature,
                                     dtype=torch.float32).clamp_(min=0.0)


def schedule(policy, state: SwitchState, seed: int, keys: torch.Tensor) -> None:
    """Sets state.switch_at for the scheduled controls (once per state: the engine calls it before its
    loop, so that no host-to-device copy happens inside a captured CUDA graph)."""
    if isinstance(policy, SCHEDULED) and state.switch_at is None:
        state.switch_at = policy.switch_at(seed, keys).to(device=keys.device, dtype=torch.int64)


def _switch_rule(d, state: SwitchState, policy: AdaSwitch, explore, position):
    """The switching rule (docs/spec.md section 2.1) for one position: returns the rows that switch; updates `state`.

    AdaSwitch: relative trigger (>= max(L, W) divergences held, d > K x their mean, d >= F), absolute
    trigger (d > A) or d = +inf; the scheduled controls: position >= switch_at. A NaN d never switches;
    only finite d are pushed (the window holds finite values only)."""
    length = policy.window
    if isinstance(policy, SCHEDULED):
        fire = position >= state.switch_at
    else:
        dd = d.double()
        eligible = state.count >= policy.min_history
        tau = policy.k * (state.window.double().sum(-1) / length)
        relative = eligible & (dd > tau) & (dd >= policy.min_divergence)
        fire = relative | (dd > policy.max_divergence) | (dd == math.inf)
    switch = explore & fire
    push = explore & ~switch & torch.isfinite(d)
    slot = (state.count % length)[:, None]
    old = state.window.gather(1, slot)
    state.window.scatter_(1, slot, torch.where(push[:, None], d[:, None], old))
    state.count += push.long()
    state.switched |= switch
    state.switch_pos.copy_(torch.where(switch, position, state.switch_pos))
    return switch


# --------------------------------------------------------------------------------------- native

# the policy kinds of the native decision ops (enum Kind in kernels/csrc/step.cpp)
_KIND_STUDENT, _KIND_TEACHER, _KIND_SKD, _KIND_ADASWITCH, _KIND_SCHEDULED = range(5)
_RULE_KINDS = (_KIND_ADASWITCH, _KIND_SCHEDULED)


@dataclass(frozen=True)
class _NativeConstants:
    """A policy's arguments to the native decision ops, computed once per policy object."""

    kind: int
    student: tuple  # (1 / temperature, greedy, the Sampling when it filters (top_k / top_p) else None)
    teacher: tuple
    rule: tuple  # (min_history, k, min_divergence, max_divergence, top_k)
    divergence: tuple  # token_divergence's (kind code, beta, alpha, temperature)


_CONSTANTS: dict[int, tuple] = {}


def _native_constants(policy) -> _NativeConstants:
    """Cached by the policy's id (the policy is kept alive with its entry, so the id cannot be reused)."""
    hit = _CONSTANTS.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]

    def sampling(s):
        return (1.0 if s.greedy else 1.0 / s.temperature, s.greedy, s if s.filtered else None)

    inf = math.inf
    rule, divergence = (0, inf, 0.0, inf, 0), (0, 0.5, 0.1, 1.0)
    if isinstance(policy, AdaSwitch):
        kind = _KIND_SCHEDULED if isinstance(policy, SCHEDULED) else _KIND_ADASWITCH
        rule = (policy.min_history, float(policy.k), float(policy.min_divergence), float(policy.max_divergence), 0)
        divergence = check_divergence_args(policy.divergence, policy.beta, policy.alpha,
                                           policy.divergence_temperature)
    elif isinstance(policy, SKD):
        # rank < top_k keeps a draft; ranks are < 2^62 (OUT_OF_VOCAB_RANK), so a larger top_k keeps all alike
        kind, rule = _KIND_SKD, (0, inf, 0.0, inf, min(policy.top_k, OUT_OF_VOCAB_RANK + 1))
    else:
        kind = _KIND_TEACHER if isinstance(policy, Teacher) else _KIND_STUDENT
    constants = _NativeConstants(kind, sampling(policy.student_sampling), sampling(policy.teacher_sampling),
                                 rule, divergence)
    if len(_CONSTANTS) >= 64:
        _CONSTANTS.clear()
    _CONSTANTS[id(policy)] = (policy, constants)
    return constants


_seed_hash = functools.lru_cache(maxsize=64)(rng.seed_hash)


def _native_state(state: SwitchState) -> bool:
    """The native ops update the state in place: its tensors must have SwitchState.new's dtypes and be
    contiguous (anything else takes the PyTorch ops)."""
    w, c, s, p, f = state.window, state.count, state.switched, state.switch_pos, state.finished
    return (w.dtype == torch.float32 and c.dtype == torch.int64 and p.dtype == torch.int64
            and s.dtype == torch.bool and f.dtype == torch.bool and w.is_contiguous() and c.is_contiguous()
            and p.is_contiguous() and s.is_contiguous() and f.is_contiguous()
            and (state.switch_at is None or (state.switch_at.dtype == torch.int64 and state.switch_at.is_contiguous())))


def _threshold(logits, sampling):
    """The draw's top_k / top_p threshold, None when unfiltered (`sampling` is the constants' third entry)."""
    return rng.sampling_threshold(logits, sampling) if logits is not None and sampling is not None else None


def _step_native(student_logits, teacher_logits, policy, state, seed, keys, position, eos, pad):
    """The step by the native op step_decide: the same tokens, flags, divergences and state as
    _step_eager(native=True), in one C++ call after the divergence."""
    c = _native_constants(policy)
    kind = c.kind
    if kind in _RULE_KINDS and student_logits is None:
        kind = _KIND_TEACHER  # every live row has switched: the teacher decides every row
    student = None if kind == _KIND_TEACHER else student_logits
    teacher = None if kind == _KIND_STUDENT else teacher_logits
    d = _divergence(student, teacher, policy, True) if kind in _RULE_KINDS else None
    token, from_teacher, divergence = native_ops().step_decide(
        student, teacher, d, keys, position, state.window, state.count, state.switched, state.switch_pos,
        state.finished, state.switch_at if kind == _KIND_SCHEDULED else None, kind, _seed_hash(seed),
        c.student[0], _threshold(student, c.student[2]), c.student[1],
        c.teacher[0], _threshold(teacher, c.teacher[2]), c.teacher[1], *c.rule, eos, pad)
    return StepOutput(token, from_teacher, divergence)


def _lookahead_native(student_logits, teacher_logits, draft, policy, state, seed, keys, position, eos, pad):
    """fused_lookahead by the native op lookahead_decide: the same result and state as
    _lookahead_eager(native=True); the teacher draws only at each row's stop."""
    c = _native_constants(policy)
    batch, g, vocab = teacher_logits.shape
    flat_t = teacher_logits.reshape(batch * g, vocab)
    d = None
    if c.kind in _RULE_KINDS:
        d = _divergence(student_logits.reshape(batch * g, vocab), flat_t, policy, True)
    accepted, token, from_teacher, divergence = native_ops().lookahead_decide(
        teacher_logits, draft, d, keys, position, state.window, state.count, state.switched, state.switch_pos,
        state.finished, state.switch_at if c.kind == _KIND_SCHEDULED else None, c.kind, _seed_hash(seed),
        c.teacher[0], _threshold(flat_t, c.teacher[2]), c.teacher[1], *c.rule, eos, pad)
    return LookaheadOutput(accepted, token, from_teacher, divergence)


# -------------------------------------------------------------------------------------- reference

def _step_eager(student_logits, teacher_logits, policy, state, seed, keys, position, eos, pad, native):
    """The step in PyTorch ops (the reference when native is False). Decisions come before the draws so
    that the native op only draws the rows whose token is used."""
    batch = keys.shape[0]
    device = keys.device
    ss, ts = policy.student_sampling, policy.teacher_sampling
    live = ~state.finished
    divergence = torch.full((batch,), math.nan, device=device)

    def student(rows):
        return _draw(student_logits, ss, seed, keys, position, rng.STREAM_STUDENT, native, rows)

    def teacher(rows):
        return _draw(teacher_logits, ts, seed, keys, position, rng.STREAM_TEACHER, native, rows)

    if isinstance(policy, (Student, Mixed)):
        token, from_teacher = student(live), torch.zeros(batch, dtype=torch.bool, device=device)
    elif isinstance(policy, Teacher) or (isinstance(policy, AdaSwitch) and student_logits is None):
        # (AdaSwitch without student logits: every live row has switched)
        token, from_teacher = teacher(live), torch.ones(batch, dtype=torch.bool, device=device)
    elif isinstance(policy, SKD):
        ys = student(live)
        from_teacher = _teacher_rank(teacher_logits, ys, native) >= policy.top_k
        token = torch.where(from_teacher, teacher(live & from_teacher), ys)
    else:
        d = _divergence(student_logits, teacher_logits, policy, native)
        explore = ~state.switched & live
        _switch_rule(d, state, policy, explore, position)
        from_teacher = state.switched.clone()
        token = torch.where(from_teacher, teacher(live & from_teacher), student(live & ~from_teacher))
        divergence = torch.where(explore, d, divergence)
    token = torch.where(live, token, torch.full_like(token, pad))
    from_teacher = from_teacher & live
    state.finished |= live & (token == eos)
    return StepOutput(token, from_teacher, divergence)


def _lookahead_eager(student_logits, teacher_logits, draft, policy, state, seed, keys, position, eos, pad,
                     native):
    batch, g, vocab = teacher_logits.shape
    device = keys.device
    positions = position[:, None] + torch.arange(g, device=device)
    flat_keys = keys[:, None].expand(batch, g).reshape(-1)
    flat_t = teacher_logits.reshape(batch * g, vocab)
    yt = _draw(flat_t, policy.teacher_sampling, seed, flat_keys, positions.reshape(-1), rng.STREAM_TEACHER,
               native).view(batch, g)
    divergence = torch.full((batch, g), math.nan, device=device)
    if isinstance(policy, AdaSwitch):
        d_all = _divergence(student_logits.reshape(batch * g, vocab), flat_t, policy, native).view(batch, g)
    if isinstance(policy, SKD):
        keep_all = (_teacher_rank(flat_t, draft.reshape(-1), native) < policy.top_k).view(batch, g)
    active = ~state.finished
    accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    token = torch.full((batch,), pad, dtype=torch.int64, device=device)
    from_teacher = torch.zeros(batch, dtype=torch.bool, device=device)
    for j in range(g):
        if isinstance(policy, AdaSwitch):
            explore = active & ~state.switched
            was_switched = active & state.switched
            switch = _switch_rule(d_all[:, j], state, policy, explore, positions[:, j])
            divergence[:, j] = torch.where(explore, d_all[:, j], divergence[:, j])
            stop = was_switched | switch
        elif isinstance(policy, SKD):
            stop = active & ~keep_all[:, j]
        elif isinstance(policy, Teacher):
            stop = active
        else:
            stop = torch.zeros_like(active)
        token = torch.where(stop, yt[:, j], token)
        from_teacher |= stop
        accept = active & ~stop
        accepted += accept.long()
        done = (accept & (draft[:, j] == eos)) | (stop & (yt[:, j] == eos))
        state.finished |= done
        active = accept & ~done
    return LookaheadOutput(accepted, token, from_teacher, divergence)


# ------------------------------------------------------------------------------------------- public

def _no_grad(fn):
    """torch.no_grad() that costs nothing when grad mode is already off (generate's loop), where the
    decorator would still enter a fresh context on every call."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.is_grad_enabled():
            with torch.no_grad():
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


@_no_grad
def fused_step(student_logits, teacher_logits, policy, state: SwitchState, *, seed: int, keys: torch.Tensor,
               position: torch.Tensor, eos_token_id: int, pad_token_id: int, impl: str | None = None
               ) -> StepOutput:
    """Decide every row's next token under `policy` and update `state` in place, with no host sync.

    Args:
        student_logits: [B, V] next-token logits of the student (None for the Teacher policy, and for
            AdaSwitch once every live row has switched: the teacher then decides every row).
        teacher_logits: [B, V] logits of the teacher (None for Student and Mixed).
        policy: Student, Teacher, Mixed (acts as Student: its per-sequence coin is the engine's), SKD or
            AdaSwitch.
        state: the rows' SwitchState (window of AdaSwitch's L columns).
        seed, keys: the RNG's seed and each row's example key (int64 [B]).
        position: int64 [B], each row's response index i (the RNG counter and the switch position).
        eos_token_id: a row that emits it finishes (-1: no EOS, rows never finish); pad_token_id: what
            finished rows emit. Both are checked against the vocabulary [0, V).
        impl: "auto" (Triton on CUDA, the native op on CPU when built, else PyTorch), "triton", "native"
            or "torch".

    Returns:
        StepOutput(token, from_teacher, divergence).
    """
    ref = teacher_logits if teacher_logits is not None else student_logits
    if ref is None:
        raise ValueError("fused_step needs student_logits or teacher_logits")
    if not isinstance(ref, torch.Tensor) or ref.dim() != 2:
        raise ValueError(f"logits must be [B, V] tensors, got {getattr(ref, 'shape', type(ref).__name__)}")
    _check_inputs(student_logits, teacher_logits, policy, state, keys, position, (ref.shape[0],), seed,
                  eos_token_id, pad_token_id)
    schedule(policy, state, seed, keys)
    which = _impl(impl, ref.device)
    if which == "triton":
        from adaswitch.kernels.triton.step import fused_step_triton

        return fused_step_triton(student_logits, teacher_logits, policy, state, seed, keys, position,
                                 eos_token_id, pad_token_id)
    if which == "native" and _has_native("step_decide") and _native_state(state):
        return _step_native(student_logits, teacher_logits, policy, state, seed, keys, position, eos_token_id,
                            pad_token_id)
    return _step_eager(student_logits, teacher_logits, policy, state, seed, keys, position, eos_token_id,
                       pad_token_id, which == "native")


@_no_grad
def fused_lookahead(student_logits, teacher_logits, draft, policy, state: SwitchState, *, seed: int,
                    keys: torch.Tensor, position: torch.Tensor, eos_token_id: int, pad_token_id: int,
                    impl: str | None = None) -> LookaheadOutput:
    """Check G drafted positions per row at once, exactly as G sequential `fused_step` calls would.

    Args:
        student_logits: [B, G, V], the student's logits at the drafted positions (those the drafts were
            drawn from, with adaswitch.ops.rng stream 0 at the same positions).
        teacher_logits: [B, G, V], the teacher's logits for the same positions (one teacher forward).
        draft: int64 [B, G], the student's drafted tokens. An SKD draft outside [0, V) is rejected (the
            teacher's draw replaces it) on every backend, without a host check; the other policies never
            read logits at a draft id.
        policy: AdaSwitch (switch scan) or SKD (top-k acceptance); Student accepts every draft, Teacher none.
        position: int64 [B], the response position of draft[:, 0].
        other arguments: as `fused_step`.

    Returns:
        LookaheadOutput(accepted, token, from_teacher, divergence [B, G]). A row stops at its switch (or
        first rejected draft), at EOS, or after G drafts; `state` is updated up to that point.

    Given the same logits, this is exactly G fused_step calls. In generate, lookahead's teacher logits
    come from one G-token forward and step mode's from 1-token forwards (different GEMMs), so "same
    tokens as step mode" holds in fp32 and up to near-ties in bf16 (docs/numerics.md).
    """
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 3:
        raise ValueError("teacher_logits must be a [B, G, V] tensor, got "
                         f"{getattr(teacher_logits, 'shape', type(teacher_logits).__name__)}")
    batch, g = teacher_logits.shape[:2]
    if student_logits is None:
        raise ValueError("fused_lookahead needs student_logits [B, G, V]")
    _check_inputs(student_logits, teacher_logits, policy, state, keys, position, (batch, g), seed,
                  eos_token_id, pad_token_id)
    if not isinstance(draft, torch.Tensor) or draft.dtype != torch.int64 or tuple(draft.shape) != (batch, g):
        got = (f"{draft.dtype} {tuple(draft.shape)}" if isinstance(draft, torch.Tensor)
               else type(draft).__name__)
        raise ValueError(f"draft must be an int64 tensor of shape {(batch, g)}, got {got}")
    if draft.device != teacher_logits.device:
        raise ValueError(f"draft must be on {teacher_logits.device}, got {draft.device}")
    schedule(policy, state, seed, keys)
    which = _impl(impl, teacher_logits.device)
    if which == "triton":
        from adaswitch.kernels.triton.step import fused_lookahead_triton

        return fused_lookahead_triton(student_logits, teacher_logits, draft, policy, state, seed, keys,
                                      position, eos_token_id, pad_token_id)
    if which == "native" and _has_native("lookahead_decide") and _native_state(state):
        return _lookahead_native(student_logits, teacher_logits, draft, policy, state, seed, keys, position,
                                 eos_token_id, pad_token_id)
    return _lookahead_eager(student_logits, teacher_logits, draft, policy, state, seed, keys, position,
                            eos_token_id, pad_token_id, which == "native")

