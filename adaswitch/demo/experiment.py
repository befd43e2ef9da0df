"""One demo experiment: the shared set-up (data, tokenizer, shipped teacher, SFT-initialised student)
and one distillation run per (method, seed) on a fixed budget of steps and prompts.

Every method gets the same number of optimizer steps on the same prompts (a seeded draw per seed), the
same optimizer and schedule (`sft.make_optimizer`) and the same loss (forward KL); only where the
response tokens come from differs. "SFT only" spends that budget on more cross-entropy fine-tuning on
the dataset's completions, the baseline distillation has to beat.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from adaswitch.demo.build_teacher import TEACHER_DIR, DataSpec

# Display name -> DistillConfig overrides (None: cross-entropy SFT, no teacher). Filled in by
# `method_overrides` with the AdaSwitch / SKD settings of the run. The last two are AdaSwitch's controls:
# the same switch without the divergence test (at the warm-up; at positions drawn from AdaSwitch's own).
METHOD_NAMES = ("SFT only", "Supervised KD", "SeqKD", "On-policy (GKD)", "Mixed(0.5)", "SKD", "AdaSwitch",
                "Fixed switch", "Random switch")
ON_POLICY = "On-policy (GKD)"
SKD_NAME = "SKD"
# AdaSwitch with its absolute trigger as well (`max_divergence`): for a student far from the teacher from the
# first token, whose divergence never spikes against its own mean (presets that set max_divergence run it)
MAX_DIVERGENCE_NAME = "AdaSwitch + max divergence"
# Two loss forms beside the divergence (docs/spec.md section 5), shown on the quick preset: on-policy with the
# sampled-token reverse-KL policy gradient, and AdaSwitch with a hard-label term on the tokens the teacher wrote
SAMPLED_NAME = "On-policy (sampled-token)"
HARD_LABEL_NAME = "AdaSwitch + hard labels"
HARD_LABEL_WEIGHT = 0.5  # weight_hard_loss beside weight_soft_loss = 1: the divergence term as in "AdaSwitch"
LOSS_FORM_METHODS = (SAMPLED_NAME, HARD_LABEL_NAME)
DEMO_LOOKAHEAD = {"skd": 4}  # the demo's fixed draft length by policy (0 for the others), see `_distill`
ALL_METHODS = (*METHOD_NAMES, MAX_DIVERGENCE_NAME, *LOSS_FORM_METHODS)
EXTRA_METRICS = ("teacher_nll", "samples")  # what a task's measure may add to a run's record (the real pair's)


def random_switch_overrides(counts: list[int]) -> dict:
    """DistillConfig overrides drawing switch positions from a Distiller's `switch_position_counts`
    (index p + 1 counts the rows that switched at p; index 0 those that never switched)."""
    pairs = [(i - 1, c) for i, c in enumerate(counts) if c > 0]
    if not pairs:
        raise ValueError("switch_position_counts is empty: AdaSwitch generated no rows")
    return {"switch_positions": [p for p, _ in pairs], "switch_weights": [float(c) for _, c in pairs]}


def method_overrides(name: str, *, window: int, k: float, skd_top_k: int, switch_counts=None,
                     max_divergence: float | None = None) -> dict | None:
    """`switch_counts`: AdaSwitch's observed switch positions (Distiller.switch_position_counts), which
    "Random switch" draws from; `max_divergence`: the absolute trigger of MAX_DIVERGENCE_NAME."""
    if name == "Random switch":
        if switch_counts is None:
            raise ValueError("Random switch needs AdaSwitch's switch_position_counts (run AdaSwitch first)")
        return {"policy": "random_switch", "window": window, "k": k, **random_switch_overrides(switch_counts)}
    table = {
        "SFT only": None,
        "Supervised KD": {"policy": "dataset"},
        "SeqKD": {"policy": "teacher"},
        "On-policy (GKD)": {"policy": "student"},
        "Mixed(0.5)": {"policy": "mixed", "lmbda": 0.5},
        "SKD": {"policy": "skd", "skd_top_k": skd_top_k},
        "AdaSwitch": {"policy": "adaswitch", "window": window, "k": k},
        "Fixed switch": {"policy": "fixed_switch", "window": window, "k": k},
        SAMPLED_NAME: {"policy": "student", "loss_kind": "sampled_reverse_kl"},
        HARD_LABEL_NAME: {"policy": "adaswitch", "window": window, "k": k, "weight_hard_loss": HARD_LABEL_WEIGHT,
                          "hard_label_mask": "teacher"},
    }
    if name == MAX_DIVERGENCE_NAME:
        if max_divergence is None:
            raise ValueError(f"{MAX_DIVERGENCE_NAME!r} needs max_divergence (a number >= 0)")
        return {"policy": "adaswitch", "window": window, "k": k, "max_divergence": max_divergence}
    if name not in table:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {name!r}")
    return table[name]


@contextlib.contextmanager
def quiet_library_bars():
    """Turns off the per-call progress bars of `datasets` (tokenisation) and `transformers` (weight
    loading) while the demo shows its own, and restores them after."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = not datasets.utils.are_progress_bars_disabled()
    transformers_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class Budget:
    """What every method gets: optimizer steps, prompts per step, learning rate, response budget."""

    steps: int
    batch_size: int
    lr: float = 1e-3
    max_new_tokens: int = 40

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class Context:
    """Everything the runs share; each run starts from a copy of `student` (never modified)."""

    tokenizer: object
    teacher: object
    student: object
    train: object
    eval: object
    teacher_accuracy: float
    student_accuracy: float
    sft_seconds: float
    student_teacher_kl: float = math.nan
    student_step_accuracy: float = math.nan
    info: dict = field(default_factory=dict)
    # measure(ctx, model, max_new_tokens=, with_kl=) -> {"accuracy", "step_accuracy", "teacher_kl", ...}: the
    # task's evaluation (None: `accuracy`, the arithmetic task's); its EXTRA_METRICS land in each run's record
    measure: object = None
    student_teacher_nll: float = math.nan

    def evaluate(self, model, *, max_new_tokens: int, with_kl: bool = False) -> dict:
        return (self.measure or accuracy)(self, model, max_new_tokens=max_new_tokens, with_kl=with_kl)


def prepare(
    *,
    student: str | Path,
    sft_steps: int = 0,
    sft_batch_size: int = 64,
    sft_lr: float = 3e-3,
    num_eval: int | None = None,
    teacher_dir: str | Path = TEACHER_DIR,
    data: DataSpec | None = None,
    max_new_tokens: int = 40,
    progress: bool = True,
    measure: bool = True,
) -> Context:
    """Loads the teacher, builds the data and the starting student, and measures both (unless
    `measure=False`: the accuracies stay NaN, for worker processes that only run distillations).

    `student` is a checkpoint directory (the shipped one: `build_teacher.STUDENT_DIR`) or the name of
    a student preset of `adaswitch.demo.models`, built fresh (seed 0) and SFT-ed for `sft_steps`."""
    from adaswitch.demo.build_teacher import load_teacher
    from adaswitch.demo.models import STUDENT_PRESETS, build_model, num_parameters, student_config
    from adaswitch.demo.sft import sft

    teacher, tokenizer = load_teacher(teacher_dir)
    teacher.requires_grad_(False)
    dataset = (data or DataSpec()).build()
    eval_split = dataset["eval"]
    if num_eval is not None:
        if not isinstance(num_eval, int) or not 1 <= num_eval <= len(eval_split):
            raise ValueError(f"num_eval must be an int in [1, {len(eval_split)}], got {num_eval!r}")
        eval_split = eval_split.select(range(num_eval))
    sft_seconds = 0.0
    if isinstance(student, str) and student in STUDENT_PRESETS:
        model = build_model(student_config(tokenizer, student), seed=0)
        if sft_steps > 0:
            fit = sft(
                model,
                tokenizer,
                dataset["train"],
                steps=sft_steps,
                batch_size=sft_batch_size,
                lr=sft_lr,
                seed=0,
                progress=progress,
            )
            sft_seconds = fit["seconds"]
        source = f"preset {student!r} + {sft_steps} SFT steps at start"
    else:
        model, student_tokenizer = load_teacher(student)
        if student_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError(f"the student at {str(student)!r} does not share the teacher's tokenizer")
        source = f"checkpoint {Path(student).name}"
    model.eval()
    ctx = Context(
        tokenizer=tokenizer,
        teacher=teacher,
        student=model,
        train=dataset["train"],
        eval=eval_split,
        teacher_accuracy=math.nan,
        student_accuracy=math.nan,
        sft_seconds=sft_seconds,
    )
    if measure:
        ctx.teacher_accuracy = ctx.evaluate(teacher, max_new_tokens=max_new_tokens)["accuracy"]
        start = ctx.evaluate(model, max_new_tokens=max_new_tokens, with_kl=True)
        ctx.student_accuracy, ctx.student_teacher_kl = start["accuracy"], start["teacher_kl"]
        ctx.student_step_accuracy = start["step_accuracy"]
    ctx.info = {
        "teacher_parameters": num_parameters(teacher),
        "student_parameters": num_parameters(model),
        "teacher_architecture": type(teacher).__name__,
        "student_architecture": type(model).__name__,
        "student_source": source,
        "sft_seconds_at_start": round(sft_seconds, 2),
        "num_train": len(dataset["train"]),
        "num_eval": len(eval_split),
    }
    return ctx


def accuracy(ctx: Context, model, *, max_new_tokens: int = 40, with_kl: bool = False) -> dict:
    """Greedy accuracy and per-step accuracy (`adaswitch.demo.task.step_checker`) on the eval split
    (`adaswitch.evaluate`), plus the teacher-forced KL if asked."""
    from adaswitch.demo.task import step_checker
    from adaswitch.train.evaluate import evaluate

    out = evaluate(
        model,
        ctx.tokenizer,
        ctx.eval,
        step_checker=step_checker,
        teacher=ctx.teacher if with_kl else None,
        max_new_tokens=max_new_tokens,
        batch_size=1000,  # greedy decoding of tiny models: per-token overhead dominates, one big batch is fastest
        progress=False,
    )
    return {k: v for k, v in out.items() if k != "examples"}


def _mean(history: list[dict], key: str) -> float:
    values = [h[key] for h in history if key in h]
    return float(sum(values) / len(values)) if values else math.nan


def run_method(ctx: Context, name: str, overrides: dict | None, *, seed: int, budget: Budget) -> dict:
    """Distils a copy of the initial student with one method; returns its metrics and the model.

    Every method of a seed sees the same `steps x batch_size` training prompts (a seeded draw)."""
    from adaswitch.demo.sft import sft

    started = time.perf_counter()
    student = copy.deepcopy(ctx.student)
    pool = ctx.train.shuffle(seed=seed).select(range(min(len(ctx.train), budget.steps * budget.batch_size)))
    if overrides is None:
        fit = sft(
            student,
            ctx.tokenizer,
            pool,
            steps=budget.steps,
            batch_size=budget.batch_size,
            lr=budget.lr,
            seed=seed,
            progress=False,
        )
        seconds, history, counts, decoding = fit["seconds"], [], None, None
    else:
        seconds, history, counts, decoding = _distill(ctx, student, pool, overrides, seed=seed, budget=budget)
    trained = time.perf_counter()
    metrics = ctx.evaluate(student, max_new_tokens=budget.max_new_tokens, with_kl=True)
    extra = {k: metrics[k] for k in EXTRA_METRICS if k in metrics}
    return {
        "method": name,
        "seed": seed,
        "accuracy": metrics["accuracy"],
        "step_accuracy": metrics["step_accuracy"],
        "teacher_kl": metrics["teacher_kl"],
        "seconds_per_step": seconds / budget.steps,
        "switch_rate": _mean(history, "switch_rate"),
        "mean_switch_position": _mean(history, "mean_switch_position"),
        "teacher_token_fraction": _mean(history, "teacher_token_fraction"),
        "response_tokens_per_step": _mean(history, "response_tokens"),
        "switch_position_counts": counts,
        "decoding": decoding,
        # where a run's wall time goes: set-up + training (Trainer included), then the eval generations
        "train_wall_seconds": round(trained - started, 2),
        "eval_seconds": round(time.perf_counter() - trained, 2),
        **extra,
        "model": student,
    }


class _StepTimer(TrainerCallback):
    """Trainer callback summing the wall time inside training steps (generation, forwards, backward,
    optimizer), leaving out Trainer's set-up, which would dominate short runs."""

    def __init__(self):
        self.seconds = 0.0
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._start


def _distill(
    ctx: Context, student, pool, overrides: dict, *, seed: int, budget: Budget
) -> tuple[float, list[dict], list | None, dict]:
    """Trains `student` in place; returns the training-step seconds, the logged steps, AdaSwitch's switch
    position counts (None without switches) and the decoding settings the config resolved (lookahead,
    guidance: fixed by the demo, see below; with a generating policy also mean_lookahead, the mean draft length
    over the logged steps)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from adaswitch.demo.sft import make_optimizer
    from adaswitch.train.config import DistillConfig
    from adaswitch.train.distiller import Distiller

    # Fixed decoding (the fastest fixed settings of the step-cost benchmark on the quick preset): under
    # lookahead="auto" the tokens are the same, but the teacher states the loss reuses round as the forwards
    # the engine picked by timing did, and the demo's digits would no longer repeat from run to run.
    decoding = dict(lookahead=DEMO_LOOKAHEAD.get(overrides.get("policy"), 0), guidance="step")
    with tempfile.TemporaryDirectory(prefix="adaswitch-demo-") as tmp:
        config = DistillConfig(
            output_dir=tmp,
            max_steps=budget.steps,
            per_device_train_batch_size=budget.batch_size,
            learning_rate=budget.lr,
            max_grad_norm=1.0,
            max_new_tokens=budget.max_new_tokens,
            seed=seed,
            data_seed=seed,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            **{**decoding, **overrides},
        )
        trainer = Distiller(
            model=student,
            teacher_model=ctx.teacher,
            args=config,
            train_dataset=pool,
            processing_class=ctx.tokenizer,
            optimizers=make_optimizer(student, steps=budget.steps, lr=budget.lr),
        )
        for callback in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(callback)
        timer = _StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    student.eval()
    counts = trainer.switch_position_counts if any(trainer.switch_position_counts) else None
    decoding = {"lookahead": config.lookahead, "guidance": config.guidance}
    logged = [h["mean_lookahead"] for h in trainer.state.log_history if "mean_lookahead" in h]
    if logged:  # the mean draft length over the run's steps (AdaSwitch leaves blocks once a row switched)
        decoding["mean_lookahead"] = sum(logged) / len(logged)
    return timer.seconds, [h for h in trainer.state.log_history if "loss" in h], counts, decoding


@torch.no_grad()
def switch_trace(
    ctx: Context, student, *, window: int, k: float, num_prompts: int, seed: int = 0, max_new_tokens: int = 40
) -> dict:
    """AdaSwitch generation on the first eval prompts: per-row switch positions and divergence traces."""
    from adaswitch.engine.generate import generate
    from adaswitch.policies import AdaSwitch

    prompts = ctx.eval["prompt"][:num_prompts]
    if all(isinstance(p, str) for p in prompts):
        batch = ctx.tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = batch["input_ids"], batch["attention_mask"]
    else:  # chat prompts: the chat template, left-padded as the Distiller batches them
        from adaswitch.train.data import prompt_batch

        ids, mask = prompt_batch(ctx.tokenizer, prompts)
    out = generate(
        student,
        ctx.teacher,
        ids,
        mask,
        policy=AdaSwitch(window=window, k=k),
        max_new_tokens=max_new_tokens,
        eos_token_id=ctx.tokenizer.eos_token_id,
        pad_token_id=ctx.tokenizer.pad_token_id,
        seed=seed,
    )
    return {
        "prompts": prompts,
        "switch_position": out.switch_position.tolist(),
        "divergence": out.divergence.tolist(),
        "lengths": out.lengths.tolist(),
        "tokens": [ctx.tokenizer.convert_ids_to_tokens(row) for row in out.response.tolist()],
        "from_teacher": out.from_teacher.tolist(),
    }
