"""Rebuilds the demo's checkpoints: `python -m adaswitch.demo.build_teacher [--model teacher|student]`.

Trains the Qwen2-style teacher (or the Llama-style student's starting point) of `adaswitch.demo.models`
from scratch by SFT on the demo task (fixed seeds), measures its greedy accuracy on the eval split and
saves model (float32 safetensors), tokenizer and `build_info.json` (settings, run time, accuracy,
versions) to the output directory. The "demo" preset produces the checkpoints shipped in
adaswitch/demo/assets/{teacher,student}, "quick" (--model student) the quick demo preset's starting
student in adaswitch/demo/assets/student_quick; "tiny" takes seconds (tests).

The student is shipped after its SFT rather than fine-tuned at every demo start: the SFT that brings it
to a useful starting accuracy takes several minutes on 2 CPU cores, most of the quick preset's budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaswitch.demo.task import TaskConfig

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER_DIR = ASSETS / "teacher"
STUDENT_DIR = ASSETS / "student"
# The quick demo preset's starting student (shipped, so that every machine starts from the same weights:
# an SFT at demo start gives a machine-dependent student, float rounding differs between CPUs).
QUICK_STUDENT_DIR = ASSETS / "student_quick"
QUICK_NUM_EVAL = 1000
MAX_CHECKPOINT_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class DataSpec:
    """The demo dataset: the teacher build and the demo runner use the same one."""

    num_train: int = 50000
    num_eval: int = 500
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)

    def build(self):
        from adaswitch.demo.task import build_dataset

        return build_dataset(self.num_train, self.num_eval, seed=self.seed, config=self.task)


@dataclass(frozen=True)
class TeacherPreset:
    model: str
    steps: int
    batch_size: int
    lr: float
    data: DataSpec
    seed: int = 0


PRESETS = {
    "demo": TeacherPreset(model="demo", steps=2000, batch_size=64, lr=3e-3, data=DataSpec()),
    "tiny": TeacherPreset(model="tiny", steps=20, batch_size=16, lr=3e-3, data=DataSpec(num_train=400, num_eval=32)),
}
# The student's starting point: a short SFT that leaves it well below the teacher. "quick": the quick
# demo preset's weaker start (600 steps, same recipe), on the data of the quick preset (its larger eval
# split is held out of the SFT data).
STUDENT_PRESETS = {
    "demo": TeacherPreset(model="demo", steps=1000, batch_size=64, lr=3e-3, data=DataSpec()),
    "quick": TeacherPreset(model="demo", steps=600, batch_size=64, lr=3e-3, data=DataSpec(num_eval=QUICK_NUM_EVAL)),
    "tiny": TeacherPreset(model="tiny", steps=10, batch_size=16, lr=3e-3, data=DataSpec(num_train=400, num_eval=32)),
}
ROLES = ("teacher", "student")


def build_teacher(
    preset: str = "demo",
    output_dir: str | Path | None = None,
    *,
    steps: int | None = None,
    model: str = "teacher",
    progress: bool = True,
) -> dict:
    """Trains, evaluates and saves the teacher (or, with model="student", the student's SFT starting
    point); returns the build info written next to it."""
    import torch
    import transformers

    from adaswitch.demo.models import build_model, num_parameters, student_config, teacher_config
    from adaswitch.demo.sft import greedy_accuracy, sft
    from adaswitch.demo.tokenizer import build_tokenizer
    from adaswitch.train.atomic import write_file

    if model not in ROLES:
        raise ValueError(f"model must be one of {ROLES}, got {model!r}")
    if preset not in (PRESETS if model == "teacher" else STUDENT_PRESETS):
        raise ValueError(f"preset must be one of {sorted(PRESETS if model == 'teacher' else STUDENT_PRESETS)}, "
                         f"got {preset!r}")
    if output_dir is None:
        if preset == "quick":
            output_dir = QUICK_STUDENT_DIR
        elif preset != "demo":
            raise ValueError(f"output_dir is required for preset {preset!r} (only 'demo' and 'quick' write the "
                             "assets)")
        else:
            output_dir = TEACHER_DIR if model == "teacher" else STUDENT_DIR
    spec = (PRESETS if model == "teacher" else STUDENT_PRESETS)[preset]
    make_config = teacher_config if model == "teacher" else student_config
    steps = spec.steps if steps is None else steps
    torch.manual_seed(spec.seed)
    data = spec.data.build()
    tokenizer = build_tokenizer()
    role, model = model, build_model(make_config(tokenizer, spec.model), seed=spec.seed)
    fit = sft(
        model,
        tokenizer,
        data["train"],
        steps=steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        seed=spec.seed,
        progress=progress,
    )
    start = time.perf_counter()
    accuracy = greedy_accuracy(model, tokenizer, data["eval"])
    eval_seconds = time.perf_counter() - start

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = (out / "model.safetensors").stat().st_size
    info = {
        "model": role,
        "preset": preset,
        "architecture": type(model).__name__,
        "parameters": num_parameters(model),
        "checkpoint_bytes": size,
        "train_steps": steps,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "seed": spec.seed,
        "data": asdict(spec.data),
        "train_seconds": round(fit["seconds"], 1),
        "final_train_loss": round(fit["loss"], 5),
        "eval_accuracy": accuracy,
        "eval_examples": spec.data.num_eval,
        "eval_seconds": round(eval_seconds, 1),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_file(out / "build_info.json", json.dumps(info, indent=2) + "\n")
    if preset in ("demo", "quick") and size > MAX_CHECKPOINT_BYTES:
        raise ValueError(f"checkpoint is {size} bytes, over the {MAX_CHECKPOINT_BYTES}-byte budget")
    return info


def load_teacher(path: str | Path = TEACHER_DIR):
    """(model, tokenizer) of a built checkpoint (teacher or student), float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"no checkpoint at {str(path)!r}; run `python -m adaswitch.demo.build_teacher`")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaswitch.demo.build_teacher", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", choices=ROLES, default="teacher", help="which checkpoint to build")
    parser.add_argument("--preset", choices=sorted(set(PRESETS) | set(STUDENT_PRESETS)), default="demo",
                        help="demo (the shipped teacher / full-preset student), quick (--model student: the quick "
                        "demo preset's starting student), tiny (tests)")
    parser.add_argument("--output-dir", default=None,
                        help=f"default: {TEACHER_DIR} or {STUDENT_DIR} (demo), {QUICK_STUDENT_DIR} (quick)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    info = build_teacher(
        args.preset, args.output_dir, steps=args.steps, model=args.model, progress=not args.no_progress
    )
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
