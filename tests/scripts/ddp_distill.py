"""A few Distiller steps on a fixed global batch of 4, under torchrun (2 x batch 2) or alone (1 x batch 4).
Plain SGD, so the weights compare linearly in the gradients (Adam would amplify rounding in tiny ones).

    torchrun --nproc_per_node 2 tests/scripts/ddp_distill.py OUT     # gloo on CPU
    python tests/scripts/ddp_distill.py OUT

Writes OUT/weights_rank{R}.pt (float64 weights) on every rank and OUT/log.json (the loss per step) on
rank 0. tests/test_ddp.py compares the two runs.
"""

import json
import os
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import close_process_group, rows, state_dict_file, tiny_student, tiny_teacher, tiny_tokenizer  # noqa: E402

from adaswitch import DistillConfig, Distiller  # noqa: E402


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    config = DistillConfig(
        output_dir=out,
        report_to=[],
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        seed=0,
        per_device_train_batch_size=4 // world,
        per_device_eval_batch_size=2 // world,
        max_steps=3,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        optim="sgd",
        learning_rate=1.0,
        policy="adaswitch",
        window=1,
        k=1e-3,
        max_new_tokens=5,
    )
    trainer = Distiller(
        model=tiny_student(max_positions=64).train(),
        teacher_model=tiny_teacher(max_positions=64),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows(4, same_length=True)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    # 3 eval rows in steps of 2: across 2 processes accelerate pads the last step with a repeated row
    evaluation = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(rows(3)))
    Path(out).mkdir(parents=True, exist_ok=True)
    state_dict_file(trainer.accelerator.unwrap_model(trainer.model), Path(out) / f"weights_rank{rank}.pt")
    if rank == 0:
        steps = [h for h in trainer.state.log_history if "loss" in h]
        Path(out, "log.json").write_text(
            json.dumps({"world": trainer.accelerator.num_processes, "steps": steps, "eval": evaluation})
        )


if __name__ == "__main__":
    main(sys.argv[1])
    close_process_group()
