"""What a run learns that Trainer's state does not hold, saved in every checkpoint beside trainer_state.json so
a resumed run continues from it: the switch-position counts (`Distiller.switch_position_counts`) and what
lookahead="auto" has measured on the pair (`Distiller.lookahead_stats`: forward timings, acceptance)."""

from __future__ import annotations

import json
import os

from adaswitch.engine.lookahead import LookaheadStats
from adaswitch.train.atomic import write_file

SWITCH_COUNTS_NAME = "switch_position_counts.json"
LOOKAHEAD_STATS_NAME = "lookahead_stats.json"


def save_run_state(checkpoint_dir: str, counts: list[int], stats: LookaheadStats) -> None:
    """Both files into a checkpoint directory, each through a temporary file and a rename."""
    save_switch_counts(checkpoint_dir, counts)
    write_file(os.path.join(checkpoint_dir, LOOKAHEAD_STATS_NAME), json.dumps(stats.state_dict()))


def load_lookahead_stats(checkpoint_dir) -> LookaheadStats:
    """The checkpoint's lookahead stats; fresh ones when it has none (written before they were saved). A
    malformed file is a ValueError naming it."""
    path = os.path.join(os.fspath(checkpoint_dir), LOOKAHEAD_STATS_NAME)
    if not os.path.isfile(path):
        return LookaheadStats()
    try:
        with open(path) as f:
            return LookaheadStats.from_state_dict(json.load(f))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path!r}: cannot read the lookahead stats ({type(exc).__name__}: {exc})") from exc


def save_switch_counts(checkpoint_dir: str, counts: list[int]) -> None:
    """Writes `counts` (rows per switch position + 1; index 0: no switch) as `SWITCH_COUNTS_NAME` in a
    checkpoint directory, through a temporary file and a rename, so the file is whole or absent."""
    path = os.path.join(checkpoint_dir, SWITCH_COUNTS_NAME)
    write_file(path, json.dumps({"switch_position_counts": [int(c) for c in counts]}))


def load_switch_counts(checkpoint_dir, length: int) -> list[int]:
    """The `switch_position_counts` saved in a checkpoint, as a list of `length` (this run's max_new_tokens
    + 1): zeros when the checkpoint has no such file (written before it was saved), padded with zeros when
    the checkpoint's budget was shorter. A malformed file, or one with rows at positions this run's budget
    cannot hold, is a ValueError naming the file."""
    path = os.path.join(os.fspath(checkpoint_dir), SWITCH_COUNTS_NAME)
    if not os.path.isfile(path):
        return [0] * length
    try:
        with open(path) as f:
            counts = json.load(f)["switch_position_counts"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path!r}: cannot read switch_position_counts ({type(exc).__name__}: {exc})") from exc
    if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                               for c in counts):
        raise ValueError(f"{path!r}: switch_position_counts must be a list of integers >= 0, got {counts!r}")
    if any(counts[length:]):
        last = max(i for i, c in enumerate(counts) if c)  # switch position last - 1
        raise ValueError(
            f"{path!r}: the checkpoint counted rows switching at response position {last - 1}, which this "
            f"run's max_new_tokens ({length - 1}) cannot reach; resume with max_new_tokens >= {last}"
        )
    return counts[:length] + [0] * (length - len(counts))
