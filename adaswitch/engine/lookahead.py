"""`lookahead="auto"`: the draft length G (0 = token by token) and the guidance of each block, chosen by the
engine from what it has measured on this pair, at the host reads it already makes (no new sync).

Why: the fastest G depends on how often the teacher keeps the student's drafts (which changes as the student
learns), on how many rows have switched, and on what a teacher forward costs next to a student one (about 2x
on a small CPU pair, 10x or more with a 7B teacher on a GPU). No fixed G fits every pair and every step.

The model, per option (G, speculative): tokens per second of the batch's slowest row, since a batch decodes
until its slowest row is done.

* Seconds per iteration: measured for the options that ran (`iteration_seconds`); for the others the sum of
  their forwards' costs (step: c_S(1) + c_T(1), c_S only while a row explores; a block: G c_S(1) + c_T(G);
  a verified block: (G + 1) c_S(1) + c_T(G + 1)), scaled by what the measured iterations cost beyond their
  forwards (the rule, the writes, the host read). c_S(q), c_T(q): seconds of a q-position forward of each
  model, timed on the forwards the engine runs; c_T(q) for an untimed q on the line through the timed ones
  (before a block has run, half of a one-position forward is taken as fixed cost, so a block is tried once
  when the model predicts it may pay).
* Tokens per iteration of a row: a step gives 1; a block, for a row that has not switched, its drafts up to
  the first rejection or switch and then the teacher's token (mean E(a, G) = (1 - a^G) / (1 - a)), 1 for a
  switched row; a verified block gives a switched row its accepted drafts and the teacher's own draw (the
  bonus token when all passed: mean E(v, G + 1)). a, v: the run's acceptance counts (Beta(1, 1) prior, older
  calls' counts halved at each new call).
* The slowest of B live rows: after T iterations a row has about T E tokens with variance T Var, so the last
  of B rows reaches the n tokens left after T with T E - z_B sqrt(T Var) = n, z_B the expected maximum of B
  standard normals. Long blocks lose more to the unluckiest row: this is what makes G = 8 slower than G = 4
  with 32 rows whose mean says otherwise.

The tokens do not depend on the choice: every G gives step mode's tokens (the drafts are the student's draws at
the same response positions; see `adaswitch.engine.generate`), and `guidance="auto"` takes speculative
verification only where it also gives step mode's tokens, a greedy teacher. Sampling teachers stay on step
guidance under "auto": speculative draws follow the teacher's distribution but are other draws, and which
blocks are verified would depend on timings, so a run would not repeat itself.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

CANDIDATES = (0, 2, 4, 8)  # the draft lengths "auto" chooses among (capped at max_new_tokens)
PRIOR_FIXED_SHARE = 0.5  # share of a one-position teacher forward taken as fixed cost before blocks are timed
SAMPLES = 16  # recent timings kept per (model, positions)
DECAY = 0.5  # weight of earlier calls' acceptance counts at each new call


def expected_tokens(acceptance: float, length: int) -> float:
    """E[tokens kept] of a block whose tokens pass one after another with probability `acceptance`, at most
    `length`, the token at the first failure included: (1 - a^L) / (1 - a)."""
    if acceptance >= 1.0:
        return float(length)
    return (1.0 - acceptance ** length) / (1.0 - acceptance)


@dataclass
class LookaheadStats:
    """What `lookahead="auto"` has learnt about a pair: forward timings and acceptance counts. Pass one object
    to successive `generate` calls (the Distiller keeps one per run and saves it with its checkpoints) so a
    call starts from what the earlier ones measured; updated in place.

    seconds: {"student:q" | "teacher:q": recent seconds of a q-position forward}.
    drafts: [offered, accepted] student drafts of rows that had not switched (AdaSwitch: a switch is a
        rejection; SKD: a draft outside the teacher's top-k), from step mode and blocks alike.
    verified: [offered, accepted] drafts of switched rows under speculative verification.
    iterations: {"G" | "G+spec": decode iterations run with that choice}, over every call.
    iteration_seconds: {iteration key (`iteration_key`): recent seconds of a whole iteration}.
    """

    seconds: dict = field(default_factory=dict)
    drafts: list = field(default_factory=lambda: [0.0, 0.0])
    verified: list = field(default_factory=lambda: [0.0, 0.0])
    iterations: dict = field(default_factory=dict)
    iteration_seconds: dict = field(default_factory=dict)

    def cost(self, model: str, positions: int) -> float | None:
        """Seconds of one forward of `model` on `positions` positions: measured, or from the line through the
        measured positions (None before any forward of that model was timed)."""
        points = sorted((int(k.split(":")[1]), _typical(v)) for k, v in self.seconds.items()
                        if k.startswith(model + ":") and v)
        exact = [t for q, t in points if q == positions]
        if exact:
            return exact[0]
        if not points:
            return None
        if len(points) == 1:
            q0, t0 = points[0]
            fixed = PRIOR_FIXED_SHARE * t0
            return fixed + (t0 - fixed) * positions / q0
        qs, ts = [q for q, _ in points], [t for _, t in points]
        mq, mt = statistics.fmean(qs), statistics.fmean(ts)
        slope = sum((q - mq) * (t - mt) for q, t in points) / sum((q - mq) ** 2 for q in qs)
        slope = max(slope, 0.0)
        fixed = max(mt - slope * mq, 0.0)
        return fixed + slope * positions

    def acceptance(self) -> float:
        offered, accepted = self.drafts
        return (accepted + 1.0) / (offered + 2.0)

    def verification(self) -> float:
        offered, accepted = self.verified
        return (accepted + 1.0) / (offered + 2.0)

    def record(self, model: str, positions: int, seconds: float) -> None:
        _push(self.seconds.setdefault(f"{model}:{positions}", []), seconds)

    def record_iteration(self, key: str, seconds: float) -> None:
        _push(self.iteration_seconds.setdefault(key, []), seconds)

    def new_call(self) -> None:
        """Earlier calls' acceptance counts weigh half: the acceptance follows a student that is learning."""
        self.drafts = [c * DECAY for c in self.drafts]
        self.verified = [c * DECAY for c in self.verified]

    def state_dict(self) -> dict:
        return {"seconds": {k: list(v) for k, v in self.seconds.items()}, "drafts": list(self.drafts),
                "verified": list(self.verified), "iterations": dict(self.iterations),
                "iteration_seconds": {k: list(v) for k, v in self.iteration_seconds.items()}}

    @classmethod
    def from_state_dict(cls, state: dict) -> LookaheadStats:
        """The stats saved by `state_dict` (a checkpoint's); a ValueError naming what is malformed."""
        try:
            stats = cls(seconds={str(k): [float(x) for x in v] for k, v in state["seconds"].items()},
                        drafts=[float(x) for x in state["drafts"]], verified=[float(x) for x in state["verified"]],
                        iterations={str(k): int(v) for k, v in state["iterations"].items()},
                        iteration_seconds={str(k): [float(x) for x in v]
                                           for k, v in state.get("iteration_seconds", {}).items()})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"lookahead stats must hold seconds, drafts, verified and iterations "
                             f"({type(exc).__name__}: {exc})") from exc
        if len(stats.drafts) != 2 or len(stats.verified) != 2 or not all(
                math.isfinite(x) and x >= 0 for x in (*stats.drafts, *stats.verified)):
            raise ValueError(f"lookahead stats: drafts and verified must be two counts >= 0, got "
                             f"{stats.drafts} and {stats.verified}")
        return stats


def _push(samples: list, seconds: float) -> None:
    samples.append(float(seconds))
    del samples[:-SAMPLES]


def _typical(samples: list) -> float:
    """The median of the recent timings (the least of one or two: a first call may include warm-up)."""
    return statistics.median(samples) if len(samples) >= 3 else min(samples)


class ForwardClock:
    """Times the engine's forwards into a LookaheadStats. CPU: the host clock around the call (a CPU forward
    has finished when it returns). CUDA: two events per forward, read after the next host read (`collect`),
    when they have completed, so timing adds no sync; forwards inside a CUDA graph capture are not timed."""

    def __init__(self, stats: LookaheadStats, device: torch.device):
        self.stats, self.cuda = stats, device.type == "cuda"
        self.pending: list = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, model: str, positions: int, started) -> None:
        """A forward of `model` on `positions` positions, begun at `started` (`start`'s value)."""
        self._stop(functools.partial(self.stats.record, model, positions), started)

    def stop_iteration(self, key: str, started) -> None:
        """A whole decode iteration of kind `key` (`iteration_key`)."""
        self._stop(functools.partial(self.stats.record_iteration, key), started)

    def _stop(self, record, started) -> None:
        if started is None:
            return
        if not self.cuda:
            record(time.perf_counter() - started)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((record, started, end))

    def collect(self) -> None:
        """After a host read: the completed CUDA timings into the stats."""
        for record, start, end in self.pending:
            record(start.elapsed_time(end) / 1000.0)
        self.pending.clear()


class Rows(NamedTuple):
    """What the host read says about the live rows."""

    exploring: bool  # some live row takes the student's drafts (has not switched; SKD: every live row)
    switched: bool  # some live row's tokens are the teacher's (switched; Teacher: every live row)
    student: bool  # the student still runs (once it stops, its cache is behind: no more drafts)
    live: int = 1  # live rows (not finished, below max_new_tokens)
    remaining: int = 1  # tokens the slowest live row still needs at most


def block_moments(acceptance: float, length: int, bonus: bool) -> tuple[float, float]:
    """(mean, variance) of the tokens one row keeps from a block: the passed tokens before the first failure
    and the teacher's token there (j + 1 tokens with probability a^j (1 - a)); all `length` passed: `length`
    tokens, or `length` + 1 with the bonus token."""
    probs = [acceptance ** j * (1 - acceptance) for j in range(length)] + [acceptance ** length]
    tokens = [j + 1 for j in range(length)] + [length + int(bonus)]
    mean = sum(p * t for p, t in zip(probs, tokens))
    return mean, max(sum(p * t * t for p, t in zip(probs, tokens)) - mean * mean, 0.0)


def slowest_row_iterations(tokens: int, rows: int, mean: float, variance: float) -> float:
    """Iterations until the last of `rows` rows, each keeping `mean` (`variance`) tokens per iteration, has
    `tokens` tokens: T with T mean - z sqrt(T variance) = tokens, z the expected maximum of `rows` standard
    normals (0 for one row)."""
    z = statistics.NormalDist().inv_cdf((rows - 0.375) / (rows + 0.25)) if rows > 1 else 0.0  # Blom's
    spread = z * math.sqrt(variance)
    u = (spread + math.sqrt(spread * spread + 4 * mean * tokens)) / (2 * mean)
    return max(u * u, 1.0)


def _forward_seconds(stats: LookaheadStats, g: int, guided: bool, student_runs: bool) -> float | None:
    """The forwards of one iteration of (g, guided): None while one of them is untimed."""
    student, teacher = stats.cost("student", 1), stats.cost("teacher", 1)
    if g == 0:
        if teacher is None or (student_runs and student is None):
            return None
        return (student if student_runs else 0.0) + teacher
    width = g + 1 if guided else g
    if student is None or teacher is None:
        return None
    return width * student + stats.cost("teacher", width)


def choose(stats: LookaheadStats, options: list, rows: Rows) -> tuple[int, bool]:
    """The fastest (G, speculative) of `options` for these rows under the model above; `options[0]` (step
    mode, the measurement) until both models' one-position forwards have been timed."""
    if not options:
        return 0, False
    student_runs = rows.student and rows.exploring
    a, v = stats.acceptance(), stats.verification()
    modeled, measured = {}, {}
    for g, guided in options:
        forwards = _forward_seconds(stats, g, guided, student_runs if g == 0 else True)
        if forwards is None:
            continue
        modeled[(g, guided)] = forwards
        samples = stats.iteration_seconds.get(iteration_key(g, guided, student_runs or g > 0))
        if samples:
            measured[(g, guided)] = _typical(samples)
    if not modeled:
        return options[0]
    # what iterations cost beyond their forwards (the rule, writes, the host read), from the measured ones
    overhead = statistics.median(measured[o] / modeled[o] for o in measured) if measured else 1.0
    best, best_rate = options[0], -1.0
    for option, forwards in modeled.items():
        g, guided = option
        seconds = measured.get(option, forwards * overhead)
        iterations = []
        if g == 0:
            iterations.append(float(rows.remaining))
        else:
            if rows.exploring:
                iterations.append(slowest_row_iterations(rows.remaining, rows.live, *block_moments(a, g, False)))
            if rows.switched:
                iterations.append(slowest_row_iterations(rows.remaining, rows.live, *block_moments(v, g, True))
                                  if guided else float(rows.remaining))
        rate = rows.remaining / (max(iterations) * max(seconds, 1e-12))
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = option, rate
    return best


def iteration_key(g: int, guided: bool, student: bool = True) -> str:
    """"G", "G+spec", or "0/teacher" for a step that runs the teacher alone."""
    if guided:
        return f"{g}+spec"
    return str(g) if student or g else "0/teacher"


__all__ = ["CANDIDATES", "ForwardClock", "LookaheadStats", "Rows", "block_moments", "choose", "expected_tokens",
           "iteration_key", "slowest_row_iterations"]
