"""Scale-out: `torchrun --nproc_per_node 2` (gloo, CPU) trains like one process on the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_student

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_distill.py"


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "log.json").read_text())


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    ddp = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",  # the launcher picks a free port (no race with other jobs on the host)
            str(SCRIPT),
        ],
        tmp_path / "ddp",
    )
    single = _run([sys.executable, str(SCRIPT)], tmp_path / "single")
    assert ddp["world"] == 2 and single["world"] == 1
    # the checkpoint holds every rank's RNG state and was renamed into place once all ranks had written
    assert sorted(os.listdir(tmp_path / "ddp")) == [
        "checkpoint-2",
        "checkpoint-3",
        "log.json",
        "weights_rank0.pt",
        "weights_rank1.pt",
    ]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= set(
        os.listdir(tmp_path / "ddp" / "checkpoint-2")
    )
    assert len(ddp["steps"]) == len(single["steps"]) == 3
    for a, b in zip(ddp["steps"], single["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["loss_tokens"] == b["loss_tokens"]  # same responses: draws keyed by dataset index
        assert a["switch_rate"] == b["switch_rate"]
    # evaluation with a padded last step (3 rows, 2 per step): the repeated row counts nowhere
    for key in ("eval_response_tokens", "eval_loss_tokens", "eval_switch_rate"):
        assert ddp["eval"][key] == single["eval"][key], key
    assert ddp["eval"]["eval_loss"] == pytest.approx(single["eval"]["eval_loss"], rel=1e-4)
    r0 = torch.load(tmp_path / "ddp" / "weights_rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "weights_rank1.pt")
    one = torch.load(tmp_path / "single" / "weights_rank0.pt")
    init = tiny_student(max_positions=64).state_dict()
    for name, w in r0.items():
        assert torch.equal(w, r1[name]), f"ranks diverged on {name}"
        step_ddp, step_one = w - init[name].double(), one[name] - init[name].double()
        assert step_one.norm() > 0, name
        assert (step_ddp - step_one).norm() <= 1e-3 * step_one.norm(), (
            f"{name}: DDP update differs from one process"
        )


@pytest.mark.slow
def test_command_line_under_torchrun_trains_data_parallel(tmp_path):
    """The README's `torchrun --nproc_per_node N -m adaswitch.cli distill ...`, run on a machine without an
    accelerator and with no device flag: the processes train data-parallel (gloo), not each alone on the
    whole dataset into the same output directory, so 2 x batch 2 updates the weights as 1 x batch 4."""
    from safetensors.torch import load_file
    from scripts.tiny_run import rows, write_models

    teacher_dir, student_dir = write_models(tmp_path / "models")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def distill(launcher, out, batch):
        settings = {"max_steps": 2, "per_device_train_batch_size": batch, "optim": "sgd", "learning_rate": 1.0,
                    "max_new_tokens": 4, "save_strategy": "no", "report_to": "none", "disable_tqdm": "true",
                    "seed": 0}
        cmd = launcher + ["-m", "adaswitch.cli", "distill", "--teacher", teacher_dir, "--student", student_dir,
                          "--train", str(train), "--output-dir", str(out)]
        for key, value in settings.items():
            cmd += ["--set", f"{key}={value}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stdout, load_file(out / "model.safetensors")

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    stdout, ddp = distill(torchrun, tmp_path / "ddp", batch=2)
    _, one = distill([sys.executable], tmp_path / "single", batch=4)
    assert stdout.count("saved the distilled student") == 1  # rank 0 only
    init = load_file(Path(student_dir) / "model.safetensors")
    for name, w in one.items():
        step_one, step_ddp = (w - init[name]).double(), (ddp[name] - init[name]).double()
        assert step_one.norm() > 0, name
        assert (step_ddp - step_one).norm() <= 1e-3 * step_one.norm(), f"{name}: DDP update differs from one process"


def test_launch_that_accelerate_runs_alone_is_refused(monkeypatch):
    """WORLD_SIZE=2 from the launcher while accelerate set up one process: refused, naming both counts."""
    from types import SimpleNamespace

    from adaswitch.train.distributed import check_enabled

    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO", device=torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 processes were launched but accelerate runs 1 "):
        check_enabled(SimpleNamespace(fsdp=False, deepspeed=None), alone, False, False)
    check_enabled(SimpleNamespace(fsdp=False, deepspeed=None), SimpleNamespace(num_processes=2), False, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_enabled(SimpleNamespace(fsdp=False, deepspeed=None), alone, False, False)
