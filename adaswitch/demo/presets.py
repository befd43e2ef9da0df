"""The demo's presets and the facts every demo entry point records: what the demo runner and the
ablation sweeps both start from, kept apart from either so neither imports the other."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from adaswitch.demo.build_teacher import QUICK_NUM_EVAL, QUICK_STUDENT_DIR, STUDENT_DIR, DataSpec
from adaswitch.demo.experiment import LOSS_FORM_METHODS, MAX_DIVERGENCE_NAME, METHOD_NAMES, Budget

SKD_TOP_K = 2  # top-2 of a 19-token vocabulary (docs/demo.md: top-25 would accept every draft)


@dataclass(frozen=True)
class DemoPreset:
    name: str
    student: str | Path  # a checkpoint directory, or a student preset name SFT-ed for sft_steps at start
    sft_steps: int
    budget: Budget
    seeds: tuple[int, ...]
    num_eval: int | None
    trace_prompts: int
    num_train: int = DataSpec().num_train
    num_eval_problems: int = DataSpec().num_eval  # the eval split built (num_eval: how many of them are used)
    pair: str = "demo"  # "demo": the shipped arithmetic pair; "real": SmolLM2 (adaswitch.demo.build_real)
    methods: tuple[str, ...] = METHOD_NAMES
    skd_top_k: int = SKD_TOP_K
    max_divergence: float | None = None  # AdaSwitch's absolute trigger of MAX_DIVERGENCE_NAME (None: not run)


PRESETS = {
    "tiny": DemoPreset(
        name="tiny",
        student="tiny",
        sft_steps=2,
        budget=Budget(steps=1, batch_size=4),
        seeds=(0, 1),
        num_eval=4,
        trace_prompts=4,
        num_train=500,
    ),
    "quick": DemoPreset(
        name="quick",
        # A weaker student (600 of the shipped student's 1,000 SFT steps, same recipe and seed), shipped in
        # assets/student_quick so that every machine starts from the same weights, and more steps at a
        # higher lr, so the methods have room to move: the shipped stronger student is not improved by any
        # method at a quick budget. 1,000 eval problems (held out of that SFT's data).
        student=QUICK_STUDENT_DIR,
        sft_steps=0,
        budget=Budget(steps=150, batch_size=32, lr=3e-3),
        seeds=(0, 1, 2),
        num_eval=None,
        trace_prompts=128,
        num_eval_problems=QUICK_NUM_EVAL,
        methods=(*METHOD_NAMES, *LOSS_FORM_METHODS),  # the two loss forms beside the divergence, too
    ),
    "full": DemoPreset(
        name="full",
        student=STUDENT_DIR,
        sft_steps=0,
        budget=Budget(steps=120, batch_size=32, lr=1e-4),
        seeds=(0, 1, 2),
        num_eval=None,
        trace_prompts=256,
    ),
    # SmolLM2-135M-Instruct and its pruned, healed student on chat prompts (adaswitch.demo.real_experiment):
    # 10 steps of 8 prompts (of the 192 train prompts), 32 new tokens, SKD's top-25 of a 49,152-token vocabulary
    # (the SKD paper's), and AdaSwitch once more with an absolute trigger (max_divergence: 3 nats of forward KL,
    # about 3x the starting student's mean teacher-forced KL on the eval answers). Sized to finish within an hour
    # on 2 CPU cores (30 runs, 2 at a time): a run's eval (the first 96 of the 128 eval prompts) costs about as much
    # as its training.
    "real": DemoPreset(
        name="real",
        pair="real",
        student="real",
        sft_steps=0,
        budget=Budget(steps=10, batch_size=8, lr=2e-4, max_new_tokens=32),
        seeds=(0, 1, 2),
        num_eval=96,
        trace_prompts=32,
        methods=(*METHOD_NAMES, MAX_DIVERGENCE_NAME),
        skd_top_k=25,
        max_divergence=3.0,
    ),
}
MAX_DEFAULT_WORKERS = 4  # beyond this the runs of a preset (33 for quick) leave workers idle at the tail


def get_preset(name: str) -> DemoPreset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


def prepare_preset(spec: DemoPreset, *, teacher_dir, progress: bool, student=None, measure: bool = True):
    """A preset's teacher, student (SFT-ed at start when the preset says so; `student`: a checkpoint
    directory instead) and data: what the demo and the ablation start from. `measure=False` skips the
    accuracy evaluations of the start (a worker process only needs the models and the data)."""
    if spec.pair == "real":
        from adaswitch.demo.real_experiment import prepare_real

        return prepare_real(num_eval=spec.num_eval, max_new_tokens=spec.budget.max_new_tokens, progress=progress,
                            measure=measure)
    from adaswitch.demo.experiment import prepare

    return prepare(
        student=spec.student if student is None else student,
        sft_steps=spec.sft_steps,
        num_eval=spec.num_eval,
        teacher_dir=teacher_dir,
        data=DataSpec(num_train=spec.num_train, num_eval=spec.num_eval_problems),
        max_new_tokens=spec.budget.max_new_tokens,
        progress=progress,
        measure=measure,
    )


def adaswitch_defaults() -> tuple[int, float]:
    """AdaSwitch's shipped (window, k): what the demo uses when --window / --k are not given."""
    from adaswitch.policies import AdaSwitch

    policy = AdaSwitch()
    return policy.window, policy.k


def default_workers() -> int:
    """One single-threaded run per CPU core this process may use, at most MAX_DEFAULT_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_WORKERS, cores))


def check_workers(workers) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    return workers


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            text=True,
            stderr=subprocess.DEVNULL,
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_facts() -> dict:
    """When, at which commit, on which CPU, with which packages and CPU code paths a run is made: what every demo
    results JSON records."""
    from adaswitch.demo.numerics import cpu_numerics
    from adaswitch.versions import package_versions

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": git_commit(), "machine": cpu_name(),
            "versions": package_versions(), "cpu_numerics": cpu_numerics()}
