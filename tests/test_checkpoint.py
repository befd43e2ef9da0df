"""Publishing a checkpoint (adaswitch/train/checkpoint.py): a process SIGKILLed at every point of a first save
and of a re-save of the same step leaves a complete checkpoint-N (the old or the new one) that resume finds,
on both the atomic-exchange path and the two-rename fallback; a stale leftover does not break the next save."""

import os
import signal
from pathlib import Path

import pytest
from transformers.trainer_utils import get_last_checkpoint

from adaswitch.train import checkpoint

OLD_POINTS = ["written", "exchanged", "published"]  # the points each path passes when checkpoint-N exists
FALLBACK_POINTS = ["written", "moved_old", "renamed", "published"]
FIRST_POINTS = ["written", "renamed", "published"]


def _checkpoint(path: Path, tag: str) -> None:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(tag)
    (path / "trainer_state.json").write_text("{}")


def _tag(run: Path, step: int = 4) -> str:
    return (run / f"checkpoint-{step}" / "model.safetensors").read_text()


def _save(run: Path, *, exchange: bool, kill_at: str | None, step: int = 4, tag: str = "new") -> int:
    """Writes a checkpoint of `step` under its staging directory and publishes it in a child process that
    SIGKILLs itself at `kill_at`; returns the child's wait status."""
    staging = run / f"{checkpoint.STAGING_PREFIX}{step}"
    written = staging / f"checkpoint-{step}"
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the save
        try:
            checkpoint.recover(str(run))
            if staging.exists():
                import shutil

                shutil.rmtree(staging)
            _checkpoint(written, tag)

            def crash(name):
                if name == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)

            checkpoint._crash_point = crash
            checkpoint.publish(str(written), str(run / f"checkpoint-{step}"), staging=str(staging),
                               exchange=exchange)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_each_point_of_a_resave_leaves_a_complete_checkpoint(tmp_path, exchange):
    points = OLD_POINTS if exchange else FALLBACK_POINTS
    for point in points:
        run = tmp_path / f"{point}"
        _checkpoint(run / "checkpoint-2", "two")
        _checkpoint(run / "checkpoint-4", "old")
        assert _killed(_save(run, exchange=exchange, kill_at=point)), point
        restored = checkpoint.recover(str(run))  # what resume (Distiller.train, the CLI) runs first
        last = get_last_checkpoint(str(run))
        assert last == str(run / "checkpoint-4"), (point, os.listdir(run))
        expected = "old" if point in ("written", "moved_old") else "new"
        assert _tag(run) == expected, point
        assert bool(restored) == (point == "moved_old")
        assert sorted(os.listdir(run / "checkpoint-4")) == ["model.safetensors", "trainer_state.json"]
        # the next save of the same step works whatever the leftovers
        assert _save(run, exchange=exchange, kill_at=None, tag="again") == 0
        assert _tag(run) == "again" and sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"], point


def test_kill_at_each_point_of_a_first_save(tmp_path):
    for point in FIRST_POINTS:
        run = tmp_path / point
        _checkpoint(run / "checkpoint-2", "two")
        assert _killed(_save(run, exchange=True, kill_at=point)), point
        checkpoint.recover(str(run))
        want = "checkpoint-2" if point == "written" else "checkpoint-4"
        assert get_last_checkpoint(str(run)) == str(run / want), point
        if point != "written":
            assert _tag(run) == "new"
        assert _save(run, exchange=True, kill_at=None, tag="again") == 0
        assert _tag(run) == "again" and sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-4"]


def test_stale_leftovers_do_not_break_a_resave(tmp_path):
    """A `checkpoint-N.old` or a `.staging-N/previous` from an earlier layout or run is no obstacle."""
    run = tmp_path / "run"
    _checkpoint(run / "checkpoint-4", "old")
    _checkpoint(run / "checkpoint-4.old", "stale")
    _checkpoint(run / ".staging-4" / "previous", "stale")
    for exchange in (True, False):
        assert _save(run, exchange=exchange, kill_at=None, tag=f"new-{exchange}") == 0
        assert _tag(run) == f"new-{exchange}"
        assert not (run / ".staging-4").exists()


def test_exchange_is_atomic_on_this_system(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _checkpoint(a, "A")
    _checkpoint(b, "B")
    if not checkpoint._exchange(str(a), str(b)):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the two-rename fallback is used")
    assert (a / "model.safetensors").read_text() == "B" and (b / "model.safetensors").read_text() == "A"
