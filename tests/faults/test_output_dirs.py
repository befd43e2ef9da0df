"""Output directories and resume (docs/spec.md 5.1): a non-empty --output-dir is
refused unless the run resumes from it or --overwrite-output-dir says so; --output-dir may not be or lie inside
--student / --teacher; a checkpoint is resumed only by a run with its settings, with steps left, with its
optimizer state and whole files. Every refusal is one line, before any model loads, with nothing on disk
changed."""

import json
import shutil

import pytest
import torch
from faultlib import distill_argv, one_line_error, run_cli, snapshot

from adaswitch import cli
from adaswitch.train.resume import RUN_SETTINGS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("a model was loaded before the error"))


@pytest.fixture(scope="module")
def finished_run(files, tmp_path_factory):
    """A one-step run of the student policy (checkpoint-1 and the final model), to copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    code = cli.main([str(a) for a in distill_argv(files, out, "--policy", "student")])
    assert code == 0
    return out


def copy_run(finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def test_non_empty_output_dir_is_refused_naming_what_it_holds(files, tmp_path, capsys, no_model_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the user's own weights")
    (out / "notes.txt").write_text("kept")
    before = snapshot(out)
    code, _, err = run_cli(distill_argv(files, out), capsys)
    one_line_error(code, err, "--output-dir", "is not empty", "model.safetensors", "notes.txt",
                   "--overwrite-output-dir", "--resume-from-checkpoint last")
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["student", "inside_student", "teacher"])
def test_output_dir_may_not_be_or_lie_inside_an_input_model(files, tmp_path, capsys, no_model_load, where):
    model = files["teacher" if where == "teacher" else "student"]
    out = {"student": model, "teacher": model, "inside_student": f"{model}/sub/../sub"}[where]
    before = snapshot(model)
    option = "--teacher" if where == "teacher" else "--student"
    code, _, err = run_cli(distill_argv(files, out, "--overwrite-output-dir"), capsys)
    one_line_error(code, err, "--output-dir", option, "choose another --output-dir")
    assert snapshot(model) == before


def test_overwrite_output_dir_replaces_the_earlier_run(files, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    (out / "checkpoint-7").mkdir()  # an earlier, longer run's checkpoint: `last` must not find it afterwards
    (out / "checkpoint-7" / "trainer_state.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    old_weights = snapshot(out / "model.safetensors")
    code, _, err = run_cli(distill_argv(files, out, "--overwrite-output-dir", "--learning-rate", "0.5"), capsys)
    assert code == 0, err[-3000:]
    assert (out / "notes.txt").read_text() == "kept"  # files the run does not write are left alone
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert snapshot(out / "model.safetensors") != old_weights


def test_resuming_another_runs_checkpoint_is_refused_naming_the_differences(
        files, finished_run, tmp_path, capsys, no_model_load):
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    argv = distill_argv(files, out, "--policy", "skd", "--max-steps", "3", "--resume-from-checkpoint", "last")
    code, _, err = run_cli(argv, capsys)
    line = one_line_error(code, err, "--resume-from-checkpoint", "checkpoint-1", "other settings")
    assert 'policy "student" (this run: "skd")' in line and "skd_top_k" not in line  # the policy, not its default
    assert snapshot(out) == before


def test_resuming_a_checkpoint_at_max_steps_is_refused(files, finished_run, tmp_path, capsys, no_model_load):
    """Trainer would train nothing and save the checkpoint's weights over the run's own final model."""
    out = copy_run(finished_run, tmp_path)
    before = snapshot(out)
    argv = distill_argv(files, out, "--policy", "student", "--resume-from-checkpoint", "last")
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "checkpoint-1", "is at step 1, at or past this run's max_steps=1", "nothing left")
    assert snapshot(out) == before


def test_resuming_with_the_same_settings_continues(files, finished_run, tmp_path, capsys):
    out = copy_run(finished_run, tmp_path)
    saved = json.loads((out / "checkpoint-1" / RUN_SETTINGS_NAME).read_text())["run_settings"]
    assert saved["policy"] == "student" and saved["per_device_train_batch_size"] == 2 and saved["processes"] == 1
    argv = distill_argv(files, out, "--policy", "student", "--max-steps", "2", "--resume-from-checkpoint", "last")
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err[-3000:]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


@pytest.mark.parametrize("damage", ["no_optimizer", "truncated_weights", "not_weights_only"])
def test_a_damaged_checkpoint_is_named_and_not_resumed(files, finished_run, tmp_path, capsys, damage):
    out = copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoint-1"
    if damage == "no_optimizer":  # Trainer would silently start a fresh optimizer
        (ckpt / "optimizer.pt").unlink()
        fragments = ["has no optimizer state (optimizer.pt)"]
    elif damage == "truncated_weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        fragments = ["model.safetensors", "is truncated"]
    else:  # a pickle torch's weights-only loader refuses
        import argparse

        torch.save({"python": argparse.Namespace(x=1)}, ckpt / "rng_state.pth")
        fragments = ["rng_state.pth", "weights-only"]
    before = snapshot(out)
    argv = distill_argv(files, out, "--policy", "student", "--max-steps", "2", "--resume-from-checkpoint", "last")
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "checkpoint-1", *fragments)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished_run.iterdir())
    changed = {k for k in snapshot(out) if snapshot(out)[k] != before.get(k)}
    assert not changed, changed


def test_a_student_whose_weights_file_is_truncated_is_named(files, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(files["student"], student)
    data = (student / "model.safetensors").read_bytes()
    (student / "model.safetensors").write_bytes(data[:1000])
    argv = distill_argv(files, tmp_path / "out")
    argv[argv.index("--student") + 1] = student
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "--student: cannot load the model in", "model.safetensors", "save_pretrained")
    assert not (tmp_path / "out").exists()
