"""No data lost: a run SIGKILLed while writing a checkpoint resumes from the last complete one and ends
with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_student

SCRIPT = Path(__file__).resolve().parent / "scripts" / "resume_distill.py"


def _run(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_same_weights(tmp_path):
    full = _run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-4000:]

    out = tmp_path / "killed"
    killed = _run(out, "--kill-at", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    # checkpoint-2 is complete; checkpoint-4 died half-written under its temporary name
    assert sorted(os.listdir(out)) == [".staging-4", "checkpoint-2"]
    assert "model.safetensors" in os.listdir(out / ".staging-4" / "checkpoint-4")
    assert not (out / "final.pt").exists()

    resumed = _run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6"} <= set(os.listdir(out))
    assert not any(n.startswith(".staging") for n in os.listdir(out))
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(out / "final.pt")
    init = tiny_student(max_positions=64).state_dict()
    assert any(not torch.equal(w, init[name].double()) for name, w in a.items())  # training moved the weights
    for name, w in a.items():
        assert torch.equal(w, b[name]), f"{name} differs after resume"
