"""Runs a list of independent distillation runs, one torch thread each, in this process or on a pool
of worker processes: what the demo and the ablation sweeps share.

These models are small enough that per-op overhead dominates, so a second torch thread buys little
while a second single-threaded run doubles the throughput. Every run starts from a fresh copy of the
same start student with its own seeds and uses one thread whatever the number of workers, so the
results do not depend on it. A worker (spawn context) loads the teacher, the student and the data
itself and skips the start's accuracy evaluations, which the main process does once.
"""

from __future__ import annotations

import contextlib
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Job:
    """One run: `method` is the name `run_method` records, `name` what progress and errors show.
    `after`: the index of the job whose `switch_position_counts` this random-switch run draws from (its
    overrides get `random_switch_overrides` of them). `tags` are added to the run's record;
    `keep_model` returns the distilled student's weights under "state_dict"."""

    name: str
    method: str
    seed: int
    overrides: dict | None
    tags: dict = field(default_factory=dict)
    after: int | None = None
    keep_model: bool = False


@contextlib.contextmanager
def single_threaded():
    """One torch thread in this process while the block runs (the start's SFT and evaluations, and the
    runs with --workers 1, round the same way as in a worker); the previous count is restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute(ctx, job: Job, overrides, budget) -> dict:
    """One run on `ctx` (no thread setting here: the caller's process is single-threaded)."""
    from adaswitch.demo.experiment import run_method

    result = run_method(ctx, job.method, overrides, seed=job.seed, budget=budget)
    model = result.pop("model")
    if job.keep_model:
        result["state_dict"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {**result, **job.tags}


# ------------------------------------------------------------------------------------ worker process
_WORKER: dict = {}


def _init_worker(spec, teacher_dir, student) -> None:
    """Runs once in each worker: one torch thread, no library progress bars, the start loaded without
    its evaluations. A failure is kept and reported by every run of this worker, with the run named."""
    try:
        import datasets
        import torch
        from transformers.utils import logging as hf_logging

        from adaswitch.demo.presets import prepare_preset

        torch.set_num_threads(1)
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
        _WORKER["ctx"] = prepare_preset(spec, teacher_dir=teacher_dir, progress=False, student=student,
                                        measure=False)
        _WORKER["budget"] = spec.budget
    except Exception:  # noqa: BLE001 - handed to the main process with the run that needed it
        _WORKER["error"] = traceback.format_exc()


def _ready() -> None:
    """A no-op submitted once per worker so the workers start loading while the main process measures."""


def _run_in_worker(job: Job, overrides) -> dict:
    if "error" in _WORKER:
        raise RuntimeError(f"loading the teacher, student and data in the worker failed:\n{_WORKER['error']}")
    try:
        return execute(_WORKER["ctx"], job, overrides, _WORKER["budget"])
    except Exception:  # noqa: BLE001 - the worker's traceback as text, since it is lost across processes
        raise RuntimeError(traceback.format_exc()) from None


# ------------------------------------------------------------------------------------ the scheduler
class RunPool:
    """`with RunPool(spec, workers=..., teacher_dir=...) as pool: results = pool.run(ctx, jobs)`.

    Enter it before preparing the main process's context: the workers load their own copy meanwhile."""

    def __init__(self, spec, *, workers: int, teacher_dir, student=None):
        self.spec, self.workers, self.teacher_dir, self.student = spec, workers, teacher_dir, student
        self._executor = None

    def __enter__(self):
        if self.workers > 1:
            import multiprocessing

            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec, self.teacher_dir, self.student),
            )
            for _ in range(self.workers):
                self._executor.submit(_ready)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._executor is None:
            return
        if exc_type is None:
            self._executor.shutdown(wait=True)
            return
        # a failed or interrupted sweep: drop the queued runs and stop the ones in flight
        processes = list(getattr(self._executor, "_processes", {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()

    def run(self, ctx, jobs: list[Job], *, progress: bool, desc: str, on_result=None) -> list[dict]:
        """The runs' records in the order of `jobs`. Jobs that others draw from start first, a job that
        draws from another as soon as that one has finished. `on_result(index, record, records)` is
        called in the main process after each run (records: None for the runs not finished yet)."""
        from tqdm.auto import tqdm

        from adaswitch.demo.experiment import random_switch_overrides

        needed = {j.after for j in jobs if j.after is not None}
        for i, job in enumerate(jobs):
            if job.after is not None and not (0 <= job.after < len(jobs) and jobs[job.after].after is None):
                raise ValueError(f"jobs[{i}].after must index a job that draws from no other, got {job.after!r}")
        order = sorted(range(len(jobs)), key=lambda i: (0 if i in needed else 1 if jobs[i].after is not None else 2, i))
        records: list[dict | None] = [None] * len(jobs)
        waiting = list(order)
        running: dict = {}

        def next_job():
            for i in waiting:
                if jobs[i].after is None or records[jobs[i].after] is not None:
                    waiting.remove(i)
                    return i
            return None

        def overrides_of(i):
            job = jobs[i]
            if job.after is None:
                return job.overrides
            counts = records[job.after]["switch_position_counts"]
            if counts is None:
                raise ValueError(f"{job.name}: {jobs[job.after].name} generated no rows to draw switch positions from")
            return {**job.overrides, **random_switch_overrides(counts)}

        def finished(i, record):
            records[i] = record
            bar.update()
            bar.set_postfix_str(jobs[i].name)
            if on_result is not None:
                on_result(i, record, records)

        bar = tqdm(total=len(jobs), desc=desc, unit="run", disable=not progress)
        try:
            if self._executor is None:
                while (i := next_job()) is not None:
                    try:
                        record = execute(ctx, jobs[i], overrides_of(i), self.spec.budget)
                    except Exception as exc:
                        raise RuntimeError(f"demo run {jobs[i].name} failed: {type(exc).__name__}: {exc}") from exc
                    finished(i, record)
            else:
                while waiting or running:
                    while len(running) < self.workers and (i := next_job()) is not None:
                        running[self._executor.submit(_run_in_worker, jobs[i], overrides_of(i))] = i
                    done, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in done:
                        i = running.pop(future)
                        try:
                            record = future.result()
                        except Exception as exc:
                            raise RuntimeError(f"demo run {jobs[i].name} failed in a worker process: {exc}") from exc
                        finished(i, record)
        finally:
            bar.close()
        return records
