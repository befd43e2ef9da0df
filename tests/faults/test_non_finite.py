"""Non-finite runs (spec 5.1): a NaN loss or gradient norm stops the run at the next log with an error that
names the step and the quantity, logged as NaN (not as the running average); no checkpoint or final model
is written from NaN weights, the checkpoints saved before stay intact; a NaN student is refused, and
`generate` says when its divergences were all NaN."""

import math
import shutil

import pytest
import torch
from faultlib import distill_argv, one_line_error, run_cli
from safetensors.torch import load_file
from tiny_models import tiny_distiller

from adaswitch.train.distiller import Distiller
from adaswitch.train.finite import NonFiniteError

pytestmark = pytest.mark.usefixtures("one_thread")


def poison(monkeypatch, *, from_step: int, what: str):
    """From optimizer step `from_step` on, the training loss is NaN (`what="loss"`) or the loss stays finite
    and its gradient is NaN (`what="grad"`)."""
    original = Distiller.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training and self.state.global_step + 1 >= from_step:
            if what == "loss":
                return loss * math.nan
            loss.register_hook(lambda g: g * math.nan)
        return loss

    monkeypatch.setattr(Distiller, "compute_loss", compute_loss)


def finite_checkpoint(path) -> bool:
    return all(torch.isfinite(w).all() for w in load_file(str(path / "model.safetensors")).values())


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_a_nan_stops_the_run_at_the_next_log(tmp_path, monkeypatch, what):
    poison(monkeypatch, from_step=3, what=what)
    trainer = tiny_distiller(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, logging_steps=1)
    with pytest.raises(NonFiniteError, match="training stopped at step 3") as info:
        trainer.train()
    quantity = {"loss": "the loss is nan", "grad": "the grad norm is nan"}[what]
    assert quantity in str(info.value)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "checkpoint-2"]  # step 3's never written
    assert all(finite_checkpoint(out / name) for name in ("checkpoint-1", "checkpoint-2"))
    last = trainer.state.log_history[-1]
    key = "loss" if what == "loss" else "grad_norm"
    assert last["step"] == 3 and math.isnan(last[key])  # logged as NaN, not as the running average


def test_a_checkpoint_is_not_written_from_nan_weights(tmp_path, monkeypatch):
    """Logs too rare to see it: the save of the next checkpoint reads the weights and refuses them."""
    poison(monkeypatch, from_step=2, what="grad")
    trainer = tiny_distiller(tmp_path, max_steps=4, save_strategy="steps", save_steps=1, logging_steps=50)
    with pytest.raises(NonFiniteError, match="before saving checkpoint-2"):
        trainer.train()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"] and finite_checkpoint(out / "checkpoint-1")


def test_the_final_model_is_not_written_from_nan_weights(tmp_path, monkeypatch):
    poison(monkeypatch, from_step=2, what="grad")
    trainer = tiny_distiller(tmp_path, max_steps=2, save_strategy="no", logging_steps=50)
    trainer.train()  # the last step's NaN gradient is never logged
    with pytest.raises(NonFiniteError, match="student's weights are not finite"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists() or not any((tmp_path / "final").iterdir())


@pytest.fixture
def nan_student(files, tmp_path):
    from transformers import AutoModelForCausalLM

    student = tmp_path / "nan_student"
    shutil.copytree(files["student"], student)
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(math.nan)
    model.save_pretrained(student)
    return student


def test_distill_refuses_a_nan_student(files, nan_student, tmp_path, capsys):
    argv = distill_argv(files, tmp_path / "out")
    argv[argv.index("--student") + 1] = nan_student
    code, out, err = run_cli(argv, capsys)
    one_line_error(code, err, "the student's weights are not finite", "model.layers.0.mlp.up_proj.weight")
    assert "saved the distilled student" not in out and not (tmp_path / "out").exists()


def generate_argv(files, student):
    return ["generate", "--teacher", files["teacher"], "--student", student, "--prompt", "what is two plus two",
            "--max-new-tokens", "3", "--color", "never"]


def test_generate_refuses_a_nan_student(files, nan_student, capsys):
    code, out, err = run_cli(generate_argv(files, nan_student), capsys)
    one_line_error(code, err, "--student: the weights in", "are not finite")
    assert "response:" not in out


def test_generate_says_when_every_divergence_was_nan(files, tmp_path, capsys):
    """Finite weights whose logits overflow to inf: the divergences are NaN, the rule can never fire."""
    from transformers import AutoModelForCausalLM

    student = tmp_path / "overflowing"
    shutil.copytree(files["student"], student)
    model = AutoModelForCausalLM.from_pretrained(student)
    with torch.no_grad():
        model.model.norm.weight.fill_(3e38)
    model.save_pretrained(student)
    code, out, err = run_cli(generate_argv(files, student), capsys)
    one_line_error(code, err, "every divergence of this run was NaN")
    assert "response:" not in out
