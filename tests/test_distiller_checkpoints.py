"""Checkpoints of a real Distiller: `switch_position_counts` is saved with each checkpoint and restored on
resume (an older checkpoint without the file resumes with empty counts), and a re-save of checkpoint-N
killed at any step of the replace (every fsync, rename, the exchange and each named point of
adaswitch/train/checkpoint.py) leaves a complete checkpoint-N, the old or the new one, that resumes."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_distiller

import adaswitch.train.distiller as distiller_module
from adaswitch.train import checkpoint
from adaswitch.train.distiller import SWITCH_COUNTS_NAME

ROWS_PER_STEP = 4  # tiny_distiller: four rows, batch 4
SWITCHING = dict(policy="adaswitch", window=1, k=1e-3)  # most rows switch early: counts spread over positions


def trainer(tmp_path, **kw):
    return tiny_distiller(tmp_path, **{**SWITCHING, **kw})


def saved_counts(directory) -> list[int]:
    return json.loads((directory / SWITCH_COUNTS_NAME).read_text())["switch_position_counts"]


def test_switch_counts_survive_a_resume(tmp_path):
    full = trainer(tmp_path, max_steps=3, save_strategy="steps", save_steps=2)
    full.train()
    at_two = saved_counts(tmp_path / "out" / "checkpoint-2")
    assert sum(at_two) == 2 * ROWS_PER_STEP and sum(full.switch_position_counts) == 3 * ROWS_PER_STEP
    assert sum(at_two[1:]) > 0  # rows did switch
    assert len(at_two) == full.args.max_new_tokens + 1

    # resume from checkpoint-2 (the counts are those saved) and run step 3 again: the same counts as the
    # uninterrupted run (generation is keyed by seed, step and row)
    resumed = trainer(tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.switch_position_counts == full.switch_position_counts


def test_checkpoint_without_counts_resumes_with_empty_counts(tmp_path):
    trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    (ckpt / SWITCH_COUNTS_NAME).unlink()  # as a checkpoint written before the counts were saved
    resumed = trainer(tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert sum(resumed.switch_position_counts) == ROWS_PER_STEP  # step 3's rows alone: the counts started empty


def restored_counts(tmp_path, monkeypatch) -> list[int]:
    """The counts a resume of tmp_path/out's last checkpoint starts from (Trainer's loop not run)."""
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: None)
    resumed = trainer(tmp_path, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    return resumed.switch_position_counts


def test_saved_counts_are_checked_on_resume(tmp_path, monkeypatch):
    trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    path = tmp_path / "out" / "checkpoint-2" / SWITCH_COUNTS_NAME
    length = 5 + 1  # max_new_tokens + 1
    path.write_text(json.dumps({"switch_position_counts": [3, 1]}))  # a shorter budget: padded
    assert restored_counts(tmp_path, monkeypatch) == [3, 1] + [0] * (length - 2)
    for content, message in (
        ("{not json", "cannot read switch_position_counts"),
        (json.dumps({"switch_position_counts": [1, -2]}), "must be a list of integers >= 0"),
        (json.dumps({"switch_position_counts": [0] * length + [0, 7]}), "response position 6"),
    ):
        path.write_text(content)
        with pytest.raises(ValueError, match=message) as info:
            restored_counts(tmp_path, monkeypatch)
        assert SWITCH_COUNTS_NAME in str(info.value)


# ---------------------------------------------------------------------------------------------------
# a re-save of checkpoint-N killed at each step of the replace


class Killed(Exception):
    """Stands for the process dying at that step: nothing after it runs."""


class StepInjector:
    """Wraps every step `checkpoint.publish` takes (fsync_tree, fsync_dir, the exchange, os.rename and the
    named crash points) while the Distiller publishes; raises Killed instead of step number `kill_at`.
    `exchange=False` makes the Distiller's publish take the two-rename fallback."""

    def __init__(self, monkeypatch, exchange: bool):
        self.kill_at, self.steps, self.active = None, [], False
        for name in ("fsync_tree", "fsync_dir", "_exchange", "_crash_point"):
            monkeypatch.setattr(checkpoint, name, self._wrap(name, getattr(checkpoint, name)))
        monkeypatch.setattr(checkpoint.os, "rename", self._wrap("rename", os.rename))
        publish = distiller_module.publish

        def publishing(*args, **kwargs):
            self.active, self.steps = True, []
            try:
                return publish(*args, exchange=exchange, **kwargs)
            finally:
                self.active = False

        monkeypatch.setattr(distiller_module, "publish", publishing)

    def _wrap(self, name, fn):
        def step(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            label = f"{name}({os.path.basename(str(args[0]))})"
            if len(self.steps) == self.kill_at:
                raise Killed(label)
            self.steps.append(label)
            return fn(*args, **kwargs)

        return step


def snapshot(ckpt) -> tuple[set, dict, list]:
    return set(os.listdir(ckpt)), load_file(str(ckpt / "model.safetensors")), saved_counts(ckpt)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_kill_at_each_step_of_a_resave_leaves_a_complete_checkpoint(tmp_path, monkeypatch, exchange):
    run = tmp_path / "out"
    first = trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    pristine = tmp_path / "pristine"
    shutil.copytree(run, pristine)
    old_files, old_weights, old_counts = snapshot(run / "checkpoint-2")
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth", SWITCH_COUNTS_NAME} <= old_files

    # the same step saved again with other weights and counts (as a run resumed from an earlier checkpoint
    # reaches it again); an undisturbed save shows the steps the replace takes
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(0.25)
    first.switch_position_counts[0] += 1000
    inject = StepInjector(monkeypatch, exchange)
    first._save_checkpoint(first.model, None)
    steps = list(inject.steps)
    assert any(s.startswith("_exchange") for s in steps) == exchange, steps
    if not exchange:  # the old checkpoint moved aside, the new one moved in
        assert sum(s.startswith("rename") for s in steps) == 2, steps
    new_files, new_weights, new_counts = snapshot(run / "checkpoint-2")
    assert new_files == old_files and not same_weights(new_weights, old_weights) and new_counts != old_counts

    for kill_at, label in enumerate(steps):
        shutil.rmtree(run)
        shutil.copytree(pristine, run)
        inject.kill_at = kill_at
        with pytest.raises(Killed):
            first._save_checkpoint(first.model, None)
        inject.kill_at = None
        where = f"killed before {label} (step {kill_at})"
        names = os.listdir(run)
        assert "checkpoint-2" in names or os.path.isdir(run / ".staging-2" / checkpoint.PREVIOUS), where

        resumed = trainer(tmp_path, max_steps=3)
        resumed.train(resume_from_checkpoint=True)  # puts a moved-aside checkpoint back first
        files, weights, counts = snapshot(run / "checkpoint-2")
        assert files == old_files, where  # complete: no file missing, none extra
        is_new = same_weights(weights, new_weights)
        assert is_new or same_weights(weights, old_weights), where
        assert counts == (new_counts if is_new else old_counts), where  # never half old, half new
        assert resumed.state.global_step == 3, where
        assert sum(resumed.switch_position_counts) == sum(counts) + ROWS_PER_STEP, where  # counts restored
