"""Whether a checkpoint may be resumed by this run: the same computation, something left to train, whole files.

Trainer resumes whatever checkpoint it is given: one written by a run with another policy or batch size
(its weights then continue under settings they were not trained with), one at or past `max_steps` (nothing
is trained and the checkpoint's weights become the run's result), one without optimizer state (a fresh
optimizer, silently). Here every checkpoint records, as JSON beside trainer_state.json (training_args.bin is a
pickle, not to be loaded to compare), the settings that decide what a training step computes
(`run_settings`), and `check_resume` refuses, before any model loads, a checkpoint that differs from the run in
any of them, that leaves nothing to train, that lacks optimizer state, or whose weights file is truncated.

Not recorded: what only changes how fast the same tokens and loss are computed (`lookahead`, `sync_every`,
`reuse_teacher_states`: docs/spec.md section 6), how long the run is (`max_steps` / `num_train_epochs`, so a
run can be extended, as with Trainer), and bookkeeping (output, logging, saving, evaluation).
"""

from __future__ import annotations

import enum
import json
import math
import os
import struct

from adaswitch.train.atomic import write_file

RUN_SETTINGS_NAME = "run_settings.json"
TRAINER_STATE = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME, without importing transformers

# DistillConfig's own fields that change no token or loss (docs/spec.md section 6), or no computation at all.
_NOT_RECORDED = ("lookahead", "sync_every", "reuse_teacher_states", "max_prompt_length", "remove_unused_columns",
                 "logging_nan_inf_filter")
# TrainingArguments fields that decide what an optimizer step computes.
_TRAINING = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "optim",
    "optim_args",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "label_smoothing_factor",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
)


class ResumeError(ValueError):
    """A checkpoint this run must not resume: the message names it, why, and what to do."""


def _plain(value):
    """A JSON value for a setting (enums by their value, tuples as lists, non-finite floats as text)."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def run_settings(args) -> dict:
    """{setting: JSON value} of the settings of `args` (a DistillConfig) that decide what a step computes."""
    from adaswitch.train.config import DistillConfig

    own = [name for name in DistillConfig.__annotations__ if name not in _NOT_RECORDED]
    settings = {name: _plain(getattr(args, name)) for name in (*own, *_TRAINING) if hasattr(args, name)}
    if settings.get("guidance") == "auto":  # "auto" writes step guidance's tokens (docs/spec.md section 6)
        settings["guidance"] = "step"
    settings["processes"] = int(getattr(args, "world_size", 1))
    return settings


def save_run_settings(checkpoint_dir, args) -> None:
    """Writes `run_settings(args)` as RUN_SETTINGS_NAME in a checkpoint directory, atomically."""
    text = json.dumps({"run_settings": run_settings(args)}, indent=1, sort_keys=True) + "\n"
    write_file(os.path.join(os.fspath(checkpoint_dir), RUN_SETTINGS_NAME), text)


def _read_json(path: str, option: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError(f"a {type(data).__name__}, not a mapping")
        return data
    except (OSError, ValueError) as exc:
        raise ResumeError(
            f"{option}: cannot read {what} {path!r} ({type(exc).__name__}: {exc}); the checkpoint is damaged: "
            "resume from another checkpoint-N"
        ) from exc


def _field_defaults() -> dict:
    """DistillConfig's own fields' defaults, as recorded: a setting a checkpoint predates (a field added in a
    later version) is the same as this run's when this run keeps its default (the behaviour before it)."""
    import dataclasses

    from adaswitch.train.config import DistillConfig

    return {f.name: _plain(f.default) for f in dataclasses.fields(DistillConfig)
            if f.default is not dataclasses.MISSING and f.name in DistillConfig.__annotations__}


def _differences(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    missing = object()
    defaults = _field_defaults()
    out = []
    for key in keys:
        a, b = saved.get(key, missing), current.get(key, missing)
        if a is missing and key in defaults and b == defaults[key]:
            continue  # a setting added after the checkpoint was written, left at its default
        if a != b:
            shown = lambda v: "unset" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key} {shown(a)} (this run: {shown(b)})")
    return out


def _check_safetensors(path: str, option: str) -> None:
    """A .safetensors file whose size is what its header says (8-byte length, JSON header, tensor data)."""
    size = os.path.getsize(path)
    fix = "the checkpoint is damaged (a copy or a save that did not finish): resume from another checkpoint-N"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head)
            header = json.loads(f.read(length)) if 8 + length <= size else None
    except (OSError, struct.error, ValueError) as exc:
        raise ResumeError(f"{option}: {path!r} is not a safetensors file ({type(exc).__name__}); {fix}") from exc
    if header is None:
        raise ResumeError(f"{option}: {path!r} is truncated ({size} bytes, its header alone needs {8 + length}); {fix}")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + length + max(ends, default=0)
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise ResumeError(f"{option}: {path!r} is {state} ({size} of {expected} bytes); {fix}")


def _has_optimizer_state(checkpoint: str) -> bool:
    """As Trainer looks for it: optimizer.pt / .bin, per-process files, or an FSDP optimizer folder."""
    for name in os.listdir(checkpoint):
        if name in ("optimizer.pt", "optimizer.bin") or name.endswith("-optimizer.pt"):
            return True
        if name.startswith("optimizer") and os.path.isdir(os.path.join(checkpoint, name)):
            return True
    return False


def check_resume(checkpoint, args, *, option: str = "resume_from_checkpoint") -> None:
    """Raises ResumeError when `args` (this run's DistillConfig) must not resume `checkpoint`: its recorded
    settings differ (each difference named), it is at or past this run's end, it has no optimizer state, or a
    weights file is truncated. A checkpoint written before settings were recorded is resumed with a warning."""
    checkpoint = os.fspath(checkpoint)
    state = _read_json(os.path.join(checkpoint, TRAINER_STATE), option, "the trainer state")
    step = state.get("global_step")
    if args.max_steps is not None and args.max_steps > 0 and isinstance(step, int) and step >= args.max_steps:
        raise ResumeError(
            f"{option}: {checkpoint!r} is at step {step}, at or past this run's max_steps={args.max_steps}: there "
            "is nothing left to train (its model files are that run's trained weights); give a larger max_steps "
            "to continue it, or start a new run in another output directory"
        )
    epoch = state.get("epoch")
    if (args.max_steps is None or args.max_steps <= 0) and isinstance(epoch, (int, float)) \
            and epoch >= args.num_train_epochs:
        raise ResumeError(
            f"{option}: {checkpoint!r} is at epoch {epoch:g}, at or past this run's num_train_epochs="
            f"{args.num_train_epochs:g}: there is nothing left to train; give more epochs (or max_steps) to "
            "continue it, or start a new run in another output directory"
        )
    path = os.path.join(checkpoint, RUN_SETTINGS_NAME)
    if os.path.isfile(path):
        saved = _read_json(path, option, "the run settings").get("run_settings")
        if not isinstance(saved, dict):
            raise ResumeError(f"{option}: {path!r} holds no run_settings mapping; resume from another checkpoint-N")
        diff = _differences(saved, run_settings(args))
        if diff:
            raise ResumeError(
                f"{option}: {checkpoint!r} was written by a run with other settings: {'; '.join(diff)}; resume "
                "with the checkpoint's settings, or start a new run in another output directory"
            )
    else:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(
            f"{checkpoint!r} has no {RUN_SETTINGS_NAME} (written by an older adaswitch): its settings cannot be "
            "compared with this run's"
        )
    if not args.deepspeed and not _has_optimizer_state(checkpoint):
        raise ResumeError(
            f"{option}: {checkpoint!r} has no optimizer state (optimizer.pt): resuming it would restart the "
            "optimizer from scratch; resume from a complete checkpoint-N (one saved without save_only_model), or "
            "start a new run from its weights (--student)"
        )
    for name in sorted(os.listdir(checkpoint)):
        if name.endswith(".safetensors"):
            _check_safetensors(os.path.join(checkpoint, name), option)


__all__ = ["RUN_SETTINGS_NAME", "ResumeError", "check_resume", "run_settings", "save_run_settings"]
