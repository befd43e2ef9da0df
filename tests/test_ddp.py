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
