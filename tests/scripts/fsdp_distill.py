"""A few Distiller steps on a fixed global batch of 4: under torchrun with FSDP2 (2 processes x batch 1 x 2
accumulation steps, the student sharded by accelerate's `fully_shard` path) or alone (1 x batch 4, no FSDP).
SGD with momentum, so the weights compare linearly in the gradients (as in ddp_distill.py) and the
optimizer has a state to resume.

    torchrun --nproc_per_node 2 tests/scripts/fsdp_distill.py OUT [RESUME_CHECKPOINT]   # gloo on CPU
    torchrun --nproc_per_node 2 tests/scripts/fsdp_distill.py OUT --no-shim   # what a CPU user gets
    torchrun ... OUT RESUME_CHECKPOINT --ram-efficient-models DIR   # from_pretrained(DIR/{student,teacher})
    python tests/scripts/fsdp_distill.py OUT                             # one process, no FSDP

On a CUDA machine it runs on the GPUs (NCCL, no shim); `--fsdp` turns FSDP on for one process as well, so
one GPU can compare `torchrun --nproc_per_node 1 ... OUT --fsdp` with `python ... OUT2`
(tests/scripts/fsdp_gpu_check.py does that).

accelerate 1.15 enables FSDP only for accelerator processes (AcceleratorState keeps a CPU process group
as MULTI_CPU and drops the FSDP plugin, so Trainer would silently run DDP). `_fsdp_on_cpu` lifts exactly
that gate for this test: the plugin Trainer built from `fsdp=True` is installed and the distributed
type set to FSDP; everything after it (accelerate's fsdp2_prepare_model, torch's fully_shard over gloo,
Trainer's FSDP checkpointing and resume, the Distiller) is the code a GPU run uses.

Writes on every rank OUT/rank{R}.json: the loss per step, the evaluation loss after training, the
responses by dataset index, how many of the student's parameters are sharded, and OUT/weights_rank{R}.pt
(float64 full weights, gathered).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import close_process_group, recording_trainer, tiny_student, tiny_teacher  # noqa: E402

from adaswitch import DistillConfig  # noqa: E402


def _fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched




def _full_weights(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().double().cpu()
        for k, v in model.state_dict().items()
    }


def main(out: str, resume: str | None, shim: bool, models: str | None, fsdp: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    gpu = torch.cuda.is_available()
    fsdp = fsdp or world > 1
    if fsdp and shim and not gpu:
        _fsdp_on_cpu()
    if models:  # as `accelerate launch --use_fsdp --fsdp_cpu_ram_efficient_loading true` sets it
        os.environ["ACCELERATE_USE_FSDP"] = "true"
    config = DistillConfig(
        output_dir=out,
        report_to=[],
        use_cpu=not gpu,
        ddp_backend="gloo" if world > 1 and not gpu else None,
        fsdp=fsdp,
        fsdp_config={"cpu_ram_efficient_loading": bool(models)} if fsdp else None,
        seed=0,
        per_device_train_batch_size=4 // world // 2 if fsdp else 4,
        gradient_accumulation_steps=2 if fsdp else 1,  # FSDP2's no-sync micro-batch, then the synced one
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1.0,
        policy="adaswitch",
        window=1,
        k=1e-3,
        max_new_tokens=5,
    )
    if models:
        # The process group exists now (DistillConfig set it up): transformers loads the weights on local
        # rank 0 only and leaves the other ranks' tensors uninitialised, for FSDP to broadcast.
        from transformers import AutoModelForCausalLM

        assert torch.distributed.is_initialized()
        student = AutoModelForCausalLM.from_pretrained(Path(models) / "student")
        teacher = AutoModelForCausalLM.from_pretrained(Path(models) / "teacher")
    else:
        student, teacher = tiny_student(max_positions=64), tiny_teacher(max_positions=64)
    trainer = recording_trainer(student, teacher, config)
    trainer.train(resume_from_checkpoint=resume)
    from torch.distributed.tensor import DTensor

    params = list(trainer.model.parameters())
    sharded = sum(isinstance(p, DTensor) and p.to_local().numel() < p.numel() for p in params)
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(_full_weights(trainer.model), Path(out) / f"weights_rank{rank}.pt")
    eval_loss = trainer.evaluate()["eval_loss"]
    log = {
        "world": trainer.accelerator.num_processes,
        "fsdp": trainer.is_fsdp_enabled,
        "ram_efficient": trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.cpu_ram_efficient_loading,
        "sharded_params": sharded,
        "params": len(params),
        "responses": trainer.recorded,
        "steps": [h for h in trainer.state.log_history if "loss" in h],
        "eval_loss": eval_loss,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("resume", nargs="?")
    parser.add_argument("--no-shim", action="store_true", help="leave accelerate's CPU gate in place")
    parser.add_argument("--ram-efficient-models", help="load the models saved here with cpu_ram_efficient_loading")
    parser.add_argument("--fsdp", action="store_true", help="FSDP with one process too (GPU: torchrun -n 1)")
    a = parser.parse_args()
    main(a.out, a.resume, shim=not a.no_shim, models=a.ram_efficient_models, fsdp=a.fsdp)
    close_process_group()
