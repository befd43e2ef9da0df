"""A full disk (docs/spec.md 5.1) during a checkpoint, the final save and `evaluate --output`: one line that
names the path and says the disk is full, never "internal error"; nothing partial left (no staging directory,
no temporary file), the previous files and checkpoints intact.

Each case runs on a real full disk, a small tmpfs, where this process may mount one (root), and always with
the writer raising what it raises on a full disk (torch's zip writer: "[enforce fail at inline_container.cc]
unexpected pos", safetensors: "No space left on device", Python: OSError ENOSPC), so CI without mount
rights runs it too."""

import json
import os
import shutil

import pytest
import transformers.modeling_utils
from faultlib import distill_argv, one_line_error, run_cli, snapshot
from safetensors import SafetensorError
from safetensors.torch import load_file
from scripts.tiny_run import rows, write_jsonl
from tiny_models import tiny_distiller

from adaswitch.train.atomic import WriteError
from adaswitch.train.distiller import Distiller

pytestmark = pytest.mark.usefixtures("one_thread")
DISKS = ["tmpfs", "mocked"]


def disk_or_skip(small_disk, size):
    directory = small_disk(size)
    if directory is None:
        pytest.skip("cannot mount a tmpfs here (the mocked variant covers this case)")
    return directory


def fill(directory) -> None:
    """Takes every free block of the file system under `directory`."""
    fd = os.open(os.path.join(directory, "balloon"), os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("disk", DISKS)
def test_checkpoint_on_a_full_disk(tmp_path, small_disk, monkeypatch, disk):
    if disk == "tmpfs":
        root = disk_or_skip(small_disk, "800k")  # checkpoint-1 (about 530 KB) fits, checkpoint-2 does not
    else:
        root = tmp_path / "disk"
        original = Distiller._save_optimizer_and_scheduler

        def full_at_step_2(self, output_dir):
            if self.state.global_step == 2:
                with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
                    f.write(b"PK partial")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return original(self, output_dir)

        monkeypatch.setattr(Distiller, "_save_optimizer_and_scheduler", full_at_step_2)
    settings = dict(max_steps=3, save_strategy="steps", save_steps=1, output_dir=str(root / "out"))
    trainer = tiny_distiller(tmp_path, **settings)
    with pytest.raises(WriteError) as info:
        trainer.train()
    message = str(info.value)
    assert "checkpoint-2" in message and "no space left on device" in message and "checkpoint-1" in message
    out = root / "out"
    assert sorted(os.listdir(out)) == ["checkpoint-1"]  # no .staging-2 left on the full disk
    assert load_file(str(out / "checkpoint-1" / "model.safetensors"))  # whole
    # the last complete checkpoint resumes once there is room again
    monkeypatch.undo()
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    resumed = tiny_distiller(tmp_path, **{**settings, "output_dir": str(moved)})
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3


@pytest.mark.parametrize("disk", DISKS)
def test_final_save_on_a_full_disk(files, tmp_path, small_disk, monkeypatch, capsys, disk):
    if disk == "tmpfs":
        root = disk_or_skip(small_disk, "120k")  # the earlier model's files fit, the new model (160 KB) does not
    else:
        root = tmp_path / "disk"

        def full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = root / "out"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\1" * 50_000)  # an earlier model, to be replaced
    (out / "config.json").write_text("{}")
    before = snapshot(out)
    argv = distill_argv(files, out, "--overwrite-output-dir", "--set", "save_strategy=no")
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, str(out), "no space left on device", "nothing in it was replaced")
    assert snapshot(out) == before  # no staging directory, no partial file, the earlier files as they were


@pytest.mark.parametrize("disk", DISKS)
def test_evaluate_output_on_a_full_disk(files, tmp_path, small_disk, python_disk_full, capsys, disk):
    data = write_jsonl(tmp_path / "many.jsonl", rows(30))  # results of several KB
    root = disk_or_skip(small_disk, "64k") if disk == "tmpfs" else tmp_path / "disk"
    root.mkdir(parents=True, exist_ok=True)
    results = root / "eval.json"
    results.write_text(json.dumps({"accuracy": 0.5}) + "\n")
    previous = results.read_text()
    if disk == "tmpfs":
        fill(root)
    else:
        python_disk_full(root, 4096)
    argv = ["evaluate", "--model", files["student"], "--data", data, "--max-new-tokens", "2", "--output", results,
            "--no-progress"]
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "--output:", str(results), "no space left on device", "previous file is unchanged")
    assert results.read_text() == previous
    assert sorted(os.listdir(root)) == sorted(["eval.json"] + (["balloon"] if disk == "tmpfs" else []))
