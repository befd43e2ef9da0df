"""A few Distiller steps on a fixed global batch of 4: under torchrun with DeepSpeed ZeRO (2 processes x batch 1 x 2
accumulation steps) or alone (1 x batch 4, no DeepSpeed). SGD with momentum as a client optimizer (no compiled
DeepSpeed op), so the weights compare linearly in the gradients as in fsdp_distill.py.

    torchrun --nproc_per_node 2 tests/scripts/deepspeed_distill.py OUT --stage {2,3}   # gloo on CPU
    torchrun ... OUT --stage 3 --models DIR        # from_pretrained(DIR/{student,teacher}) after the config
    torchrun ... OUT RESUME_CHECKPOINT --stage S   # resume a run of the same stage (and --models)
    python tests/scripts/deepspeed_distill.py OUT  # one process, no DeepSpeed

Nothing is patched in accelerate: under torchrun, Trainer's Accelerator enables DeepSpeed on CPU processes too
(only `accelerate launch --cpu` / ACCELERATE_USE_CPU turns it off, which Distiller refuses), and DeepSpeed picks
its CPU accelerator, whose collectives go through the gloo process group. Two CPU-only differences remain:
- DeepSpeed's CPU accelerator compiles a shared-memory allreduce (a C++ extension, about a minute on first use);
  the runs leave it out unless `--shm` (see `_without_shm_op`);
- `--models`: under ZeRO-3, from_pretrained creates the models inside `deepspeed.zero.Init`, which needs
  DeepSpeed's comm; on GPUs accelerate starts it with the process group, on CPU processes only torch's process
  group is started, so the script calls `deepspeed.init_distributed` (which adopts it) first. The student and
  the teacher then arrive partitioned; the teacher stays so at rest and is gathered per step.

Writes on every rank OUT/rank{R}.json (loss per step, evaluation loss, responses by dataset index, how many of the
student's parameters are partitioned, whether the teacher is) and OUT/weights_rank{R}.pt (float64 full weights).
"""

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import close_process_group, recording_trainer, tiny_student, tiny_teacher  # noqa: E402

from adaswitch import DistillConfig  # noqa: E402


def _without_shm_op() -> None:
    """DeepSpeed's CPU accelerator compiles a shared-memory allreduce (a C++ extension, about a minute on first
    use) for its collectives; without it they go through the gloo process group, as they go through NCCL on
    GPUs. Only the time differs."""
    # (deepspeed.comm re-exports the name `torch`, so the module is looked up by its full name)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None




def _full_weights(trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3: gather the partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().double().cpu().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().double().cpu() for k, v in model.state_dict().items()}


def main(out: str, resume: str | None, stage: int | None, models: str | None, shm: bool) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    ds = world > 1
    if ds and not shm:
        _without_shm_op()
    if not models:  # built before the config: not partitioned, whatever the stage
        student, teacher = tiny_student(max_positions=64), tiny_teacher(max_positions=64)
    ds_config = {
        # ZeRO-3 keeps parameters below the persistence threshold (1e5 elements by default: all of a tiny model)
        # whole on every process; 0 partitions every one
        "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    config = DistillConfig(
        output_dir=out,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if ds else None,
        deepspeed=ds_config if ds else None,
        seed=0,
        per_device_train_batch_size=4 // world // 2 if ds else 4,
        gradient_accumulation_steps=2 if ds else 1,
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
    teacher_partitioned = False
    if models:
        import deepspeed
        from transformers import AutoModelForCausalLM

        # Under ZeRO-3, from_pretrained creates the models inside deepspeed.zero.Init, which needs DeepSpeed's
        # comm. On GPUs accelerate starts it with the process group; on CPU processes it starts torch's only,
        # so it is started here (it adopts that group).
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        student = AutoModelForCausalLM.from_pretrained(Path(models) / "student")
        teacher = AutoModelForCausalLM.from_pretrained(Path(models) / "teacher")
        teacher_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in teacher.parameters())
    trainer = recording_trainer(student, teacher, config)
    trainer.train(resume_from_checkpoint=resume)
    params = list(trainer.accelerator.unwrap_model(trainer.model).parameters())
    partitioned = sum(hasattr(p, "ds_id") and p.numel() == 0 for p in params)  # empty outside a gather
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save(_full_weights(trainer), Path(out) / f"weights_rank{rank}.pt")
    eval_loss = trainer.evaluate()["eval_loss"]
    log = {
        "world": trainer.accelerator.num_processes,
        "deepspeed": trainer.is_deepspeed_enabled,
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else 0,
        "engine": type(trainer.model_wrapped).__name__,
        "partitioned_params": partitioned,
        "params": len(params),
        "teacher_partitioned": teacher_partitioned,
        "teacher_partitioned_after": all(p.numel() == 0 for p in trainer.teacher_model.parameters()),
        "responses": trainer.recorded,
        "steps": [h for h in trainer.state.log_history if "loss" in h],
        "eval_loss": eval_loss,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(log))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("resume", nargs="?")
    parser.add_argument("--stage", type=int, choices=(2, 3), default=2, help="ZeRO stage (torchrun runs)")
    parser.add_argument("--models", help="from_pretrained(DIR/student, DIR/teacher) after the config")
    parser.add_argument("--shm", action="store_true", help="DeepSpeed's compiled shared-memory allreduce")
    a = parser.parse_args()
    main(a.out, a.resume, a.stage, a.models, shm=a.shm)
    close_process_group()
