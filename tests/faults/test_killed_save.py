"""A run killed at several points of a checkpoint save, then resumed, ends with the weights of an uninterrupted
run, bit for bit (as before this suite; tests/test_resume.py does it once with a real SIGKILL in a subprocess,
tests/test_distiller_checkpoints.py kills every step of the rename). Here the kill is a BaseException, which
no `except Exception` cleanup sees: what it leaves is what SIGKILL leaves."""

import pytest
import torch
from tiny_models import tiny_distiller

import adaswitch.train.distiller as distiller_module
from adaswitch.train.distiller import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(max_steps=4, save_strategy="steps", save_steps=2, policy="adaswitch", window=1, k=1e-3)


class Killed(BaseException):
    """Stands for SIGKILL."""


# where the kill lands: just before this function of the save of checkpoint-STEP runs (checkpoint-2 once
# published: checkpoint-4 would be the run's last, which a resume refuses, as there is nothing left to train)
POINTS = {
    "model_written": (Distiller, "_save_optimizer_and_scheduler", 4),
    "optimizer_written": (Distiller, "_save_rng_state", 4),
    "all_written": (distiller_module, "publish", 4),
    "published": (distiller_module, "rotate_checkpoints", 2),
}


def weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = tiny_distiller(tmp_path_factory.mktemp("full"), **SETTINGS)
    trainer.train()
    return weights(trainer)


@pytest.mark.parametrize("point", sorted(POINTS))
def test_killed_save_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, uninterrupted, point):
    owner, name, step = POINTS[point]
    original = getattr(owner, name)

    def kill_at_step(*args, **kwargs):
        if trainer.state.global_step == step:
            raise Killed(point)
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(owner, name, kill_at_step)
        trainer = tiny_distiller(tmp_path, **SETTINGS)
        with pytest.raises(Killed):
            trainer.train()
    resumed = tiny_distiller(tmp_path, **SETTINGS)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == SETTINGS["max_steps"]
    got = weights(resumed)
    assert got.keys() == uninterrupted.keys()
    for key, w in uninterrupted.items():
        assert torch.equal(got[key], w), f"{key} differs after a kill at {point}"
