"""Tiny distillation runs shared by the training tests and the scripts they launch (torchrun, SIGKILL).

Models come from tests/tiny_models.py (built from configs, fixed seeds), saved with save_pretrained so
the command line and `from_pretrained` paths are exercised too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from tiny_models import tiny_student, tiny_teacher, tiny_tokenizer  # noqa: E402

NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def rows(n: int, *, same_length: bool = False) -> list[dict]:
    """Prompt/completion rows of the tiny vocabulary; `same_length` makes every prompt 5 tokens."""
    out = []
    for i in range(n):
        a, b = NUMBERS[i % 10], NUMBERS[(3 * i + 1) % 10]
        prompt = (
            f"what is {a} plus {b}" if same_length else " ".join(["what is", a] + ["plus", b] * (1 + i % 2))
        )
        out.append({"prompt": prompt, "completion": f"{a} plus {b} equals answer {i % 10}"})
    return out


def write_jsonl(path, data: list[dict]) -> str:
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def write_models(root) -> tuple[str, str]:
    """Saves the tiny teacher and student (each with the shared tokenizer) under root; returns their dirs."""
    root = Path(root)
    tok = tiny_tokenizer()
    dirs = []
    for name, model in (
        ("teacher", tiny_teacher(max_positions=64)),
        ("student", tiny_student(max_positions=64)),
    ):
        d = root / name
        model.save_pretrained(d)
        tok.save_pretrained(d)
        dirs.append(str(d))
    return dirs[0], dirs[1]


def write_inputs(root) -> dict:
    """What a CLI test needs under root: the saved tiny teacher and student, 4 training rows, 3 test rows."""
    teacher, student = write_models(root)
    return {
        "root": root,
        "teacher": teacher,
        "student": student,
        "train": write_jsonl(Path(root) / "train.jsonl", rows(4)),
        "test": write_jsonl(Path(root) / "test.jsonl", rows(3)),
    }


def state_dict_file(model, path) -> None:
    """Float64 copies of the weights, for exact comparisons across processes."""
    import torch

    torch.save({k: v.detach().double().cpu() for k, v in model.state_dict().items()}, path)



def recording_distiller():
    """A Distiller that keeps every response it generates, {global step: {dataset index: ids}}, so runs
    under different parallelisms (DDP, FSDP, DeepSpeed, one process) can be compared token by token."""
    from adaswitch import Distiller

    class RecordingDistiller(Distiller):
        def _responses(self, model, inputs):
            out = super()._responses(model, inputs)
            for key, ids in zip(inputs["example_keys"].tolist(), out[0].tolist()):
                self.recorded.setdefault(str(self.state.global_step), {})[str(key)] = ids
            return out

    return RecordingDistiller


def recording_trainer(student, teacher, config):
    """The recording Distiller on the fixed data of the parallelism tests: 4 training rows, the same 4
    reversed for evaluation, SGD with momentum (weights compare linearly in the gradients; a stateless
    optimizer cannot be resumed under FSDP2: torch's set_optimizer_state_dict asserts on it)."""
    import datasets
    import torch

    trainer = recording_distiller()(
        model=student.train(),
        teacher_model=teacher,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows(4, same_length=True)),
        eval_dataset=datasets.Dataset.from_list(rows(4, same_length=True)[::-1]),
        processing_class=tiny_tokenizer(),
        optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": 1.0, "momentum": 0.5}),
    )
    trainer.recorded = {}
    return trainer


def close_process_group() -> None:
    """Ends a torchrun run cleanly once its results are written: every rank waits for the others, the process
    group is destroyed, and the process exits without interpreter finalization. destroy_process_group
    unregisters the gloo group but its threads live on while DTensor specs still reference FSDP2's
    DeviceMesh; finalization then tears them down and occasionally aborts a rank that already succeeded
    ("terminate called without an active exception": 2 of 55 resumed FSDP runs on a loaded 2-core machine)."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
