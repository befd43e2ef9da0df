"""FSDP2: `torchrun --nproc_per_node 2` (gloo, CPU) with the student sharded (and gradient accumulation) trains
like one process on the same global batch, generates the same tokens, evaluates alike, and resumes from its
checkpoint exactly.

accelerate enables FSDP only on accelerators, so tests/scripts/fsdp_distill.py lifts that one gate (see
its docstring); without it a CPU run with fsdp=True must be refused rather than silently run as DDP.
"""

import os
from pathlib import Path

import pytest
import torch
from distributed_runs import launch, merged_responses, run
from scripts.tiny_run import write_models
from tiny_models import tiny_student

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp_distill.py"


def _run(out, *extra, world=2):
    return run(SCRIPT, out, *extra, world=world)


_responses = merged_responses


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(tmp_path):
    fsdp, w_fsdp = _run(tmp_path / "fsdp")
    single, w_one = _run(tmp_path / "single", world=1)
    assert fsdp[0]["fsdp"] and fsdp[0]["world"] == 2 and not single[0]["fsdp"]
    # every parameter of the student is a DTensor whose local shard is smaller than the full tensor
    assert fsdp[0]["sharded_params"] == fsdp[0]["params"] > 0

    # generation on the gathered weights: the tokens of the unsharded model, row by row
    assert _responses(fsdp) == _responses(single)
    assert len(fsdp[0]["steps"]) == len(single[0]["steps"]) == 3
    for a, b in zip(fsdp[0]["steps"], single[0]["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # global token mean under reduce-scatter
        assert a["loss_tokens"] == b["loss_tokens"]
    assert fsdp[0]["eval_loss"] == pytest.approx(single[0]["eval_loss"], rel=1e-4)  # evaluation sharded too
    init = tiny_student(max_positions=64).state_dict()
    for name, w in w_fsdp.items():
        step_fsdp, step_one = w - init[name].double(), w_one[name] - init[name].double()
        assert step_one.norm() > 0, name
        assert (step_fsdp - step_one).norm() <= 1e-3 * step_one.norm(), f"{name}: FSDP update differs"

    # Trainer's FSDP checkpoint (full state dict + per-rank RNG), renamed into place once complete
    assert sorted(os.listdir(tmp_path / "fsdp")) == [
        "checkpoint-2",
        "checkpoint-3",
        "rank0.json",
        "rank1.json",
        "weights_rank0.pt",
        "weights_rank1.pt",
    ]
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= (
        set(os.listdir(tmp_path / "fsdp" / "checkpoint-2"))
    )

    # resume from step 2 under FSDP: step 3 repeats the uninterrupted run (weights, optimizer, draws); the
    # models come from from_pretrained with cpu_ram_efficient_loading (accelerate shards the student from
    # the meta device and broadcasts rank 0's weights; the teacher, not sharded, must be whole everywhere)
    teacher_dir, _ = write_models(tmp_path / "models")
    resumed, w_resumed = _run(
        tmp_path / "resumed",
        str(tmp_path / "fsdp" / "checkpoint-2"),
        "--ram-efficient-models",
        str(Path(teacher_dir).parent),
    )
    assert resumed[0]["ram_efficient"] and not fsdp[0]["ram_efficient"]
    full = _responses(fsdp)  # keyed by the global step before it: training 0, 1, 2, then evaluation 3
    assert _responses(resumed) == {"2": full["2"], "3": full["3"]}
    assert resumed[0]["steps"][-1]["loss"] == pytest.approx(fsdp[0]["steps"][-1]["loss"], rel=1e-6)
    for name, w in w_fsdp.items():
        assert torch.allclose(w_resumed[name], w, rtol=0, atol=1e-7), f"{name}: resumed run differs"


@pytest.mark.slow
def test_fsdp_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    proc = launch(SCRIPT, tmp_path / "out", "--no-shim")
    assert proc.returncode != 0
    assert "fsdp=True but accelerate did not enable FSDP on cpu" in proc.stderr
