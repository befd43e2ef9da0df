"""The AdaSwitch ablations: `python -m adaswitch.demo.ablation` (or `adaswitch demo --ablation`).

Distils the demo student with AdaSwitch for every window L in {4, 8, 16} and K in {1.5, 2, 3, 5}, on
the quick preset's budget and seeds, and ranks the settings by mean eval accuracy (ties: lower
teacher-forced KL). The winner is what `adaswitch.AdaSwitch()` ships as its default; docs/ablation.md
records the table. With --switch: the switching-rule sweep at the shipped L, K (the divergence D, the
floor F = min_divergence, the absolute trigger A = max_divergence), with paired per-seed differences
against the default; `--switch --render FILE` regenerates its table and plot from the JSON. Both sweeps
are lists of named settings run over the seeds by one runner (`run_sweep`), on the demo's pool of
single-threaded runs (`--workers`).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from adaswitch.demo.build_teacher import TEACHER_DIR
from adaswitch.demo.presets import (
    adaswitch_defaults,
    check_workers,
    default_workers,
    get_preset,
    prepare_preset,
    run_facts,
)

WINDOWS = (4, 8, 16)
KS = (1.5, 2.0, 3.0, 5.0)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def rank(cells: list[dict]) -> list[dict]:
    """Best first: highest mean accuracy, then lowest teacher KL."""
    return sorted(cells, key=lambda c: (-c["accuracy"], c["teacher_kl"]))


def format_table(cells: list[dict], best: dict) -> str:
    """Markdown: rows = window, columns = K, cells = accuracy mean ± std (switch rate); best in bold."""
    ks = sorted({c["k"] for c in cells})
    header = "| window \\ K | " + " | ".join(f"{k:g}" for k in ks) + " |"
    lines = [header, "|---" * (len(ks) + 1) + "|"]
    for w in sorted({c["window"] for c in cells}):
        row = [f"**{w}**"]
        for k in ks:
            c = next((c for c in cells if c["window"] == w and c["k"] == k), None)
            if c is None:
                row.append("-")
                continue
            text = f"{100 * c['accuracy']:.1f} ± {100 * c['accuracy_std']:.1f} (sw {c['switch_rate']:.2f})"
            row.append(f"**{text}**" if c is best else text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Setting:
    """One row of a sweep: `method` is the name each run records, `overrides` its DistillConfig overrides,
    `tags` what each run's record adds; `draws_from`: the earlier setting whose switch positions of the
    same seed this random-switch control draws from."""

    name: str
    method: str
    overrides: dict
    tags: dict = field(default_factory=dict)
    draws_from: str | None = None


def run_sweep(
    spec,
    settings: list[Setting],
    seeds: tuple[int, ...],
    *,
    path: Path,
    build,
    teacher_dir,
    workers: int,
    progress: bool,
    desc: str,
) -> list[dict]:
    """Runs every setting over the seeds on the demo's pool and returns the runs, seed by seed in
    settings order. `build(runs, ctx)` is the JSON written to `path` each time another seed is complete,
    so an interrupted sweep leaves its complete seeds."""
    from adaswitch.demo.experiment import quiet_library_bars
    from adaswitch.demo.pool import Job, RunPool, single_threaded
    from adaswitch.train.atomic import write_file

    names = [st.name for st in settings]
    for i, st in enumerate(settings):
        if st.draws_from is not None and st.draws_from not in names[:i]:
            raise ValueError(f"setting {st.name!r}: draws_from must name an earlier setting, got {st.draws_from!r}")
    jobs, index = [], {}
    for seed in seeds:
        for st in settings:
            index[(st.name, seed)] = len(jobs)
            after = None if st.draws_from is None else index[(st.draws_from, seed)]
            jobs.append(Job(name=f"{st.name}, seed {seed}", method=st.method, seed=seed, overrides=st.overrides,
                            tags=st.tags, after=after))
    written = set()

    def write_complete_seeds(_, __, records):
        complete = [s for s in seeds if all(records[index[(name, s)]] is not None for name in names)]
        if set(complete) != written:
            written.update(complete)
            runs = [records[index[(name, s)]] for s in complete for name in names]
            write_file(path, json.dumps(build(runs, ctx), indent=2, default=lambda v: None) + "\n")

    with single_threaded(), quiet_library_bars(), RunPool(spec, workers=workers, teacher_dir=teacher_dir) as pool:
        ctx = prepare_preset(spec, teacher_dir=teacher_dir, progress=progress)
        records = pool.run(ctx, jobs, progress=progress, desc=desc, on_result=write_complete_seeds)
    return records


def _check_seeds(spec, seeds) -> tuple[int, ...]:
    seeds = spec.seeds if seeds is None else tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be distinct non-negative ints, got {seeds!r}")
    return seeds


def run_ablation(
    preset: str = "quick",
    output_dir: str | Path = "demo_out",
    *,
    teacher_dir=TEACHER_DIR,
    windows=WINDOWS,
    ks=KS,
    seeds=None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Runs the window x K sweep; writes ablation.json; returns {"meta", "cells", "best", "table"}."""
    from adaswitch.policies import AdaSwitch

    spec = get_preset(preset)
    for w in windows:
        for k in ks:
            AdaSwitch(window=w, k=k)  # bad values are reported before any work
    seeds = _check_seeds(spec, seeds)
    workers = check_workers(default_workers() if workers is None else workers)
    settings = [Setting(name=f"L = {w}, K = {k:g}", method="AdaSwitch",
                        overrides={"policy": "adaswitch", "window": w, "k": k}, tags={"window": w, "k": k})
                for w in windows for k in ks]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def build(runs, ctx):
        cells = window_cells(runs, windows, ks)
        best = rank(cells)[0]
        return {
            "meta": {
                "preset": preset,
                **run_facts(),
                "seeds": [s for s in seeds if any(r["seed"] == s for r in runs)],
                "budget": {"steps": spec.budget.steps, "batch_size": spec.budget.batch_size, "lr": spec.budget.lr},
                "teacher_accuracy": ctx.teacher_accuracy,
                "student_after_sft_accuracy": ctx.student_accuracy,
                "total_seconds": round(time.perf_counter() - started, 1),
                **ctx.info,
                "workers": workers,
                "threads_per_worker": 1,
            },
            "cells": cells,
            "best": {"window": best["window"], "k": best["k"], "accuracy": best["accuracy"]},
        }

    path = out / "ablation.json"
    run_sweep(spec, settings, seeds, path=path, build=build, teacher_dir=teacher_dir, workers=workers,
              progress=progress, desc="ablation")
    result = json.loads(path.read_text())
    cells = result["cells"]
    result["table"] = format_table(cells, next(c for c in cells if (c["window"], c["k"]) == (
        result["best"]["window"], result["best"]["k"])))
    return result


def window_cells(runs: list[dict], windows, ks) -> list[dict]:
    """One cell per (window, k) with runs: means over seeds."""
    cells = []
    for w in windows:
        for k in ks:
            mine = [r for r in runs if r["window"] == w and r["k"] == k]
            if not mine:
                continue
            acc = [r["accuracy"] for r in mine]
            cells.append(
                {
                    "window": w,
                    "k": k,
                    "accuracy": statistics.fmean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "accuracies": acc,
                    "teacher_kl": _mean([r["teacher_kl"] for r in mine]),
                    "switch_rate": _mean([r["switch_rate"] for r in mine]),
                    "mean_switch_position": _mean([r["mean_switch_position"] for r in mine]),
                    "seconds_per_step": _mean([r["seconds_per_step"] for r in mine]),
                }
            )
    return cells


# ------------------------------------------------------------------------------- the switching-rule sweep
# At the shipped L, K: the divergence D compared with its moving mean, the floor F (min_divergence) and
# the absolute trigger A (max_divergence), each varied alone from the forward-KL default (F = 0, A off).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
MIN_DIVERGENCES = (0.1, 1.0)
MAX_DIVERGENCES = (0.5, 2.0)
BASELINE = "forward KL (default)"
CONTROLS = ("fixed switch", "random switch")


def switch_configs(divergences=DIVERGENCES, min_divergences=MIN_DIVERGENCES, max_divergences=MAX_DIVERGENCES,
                   controls=CONTROLS):
    """[{"name", "policy", "divergence", "min_divergence", "max_divergence"}], the forward-KL default first;
    then AdaSwitch's controls without the divergence test (the random one draws from the default's switch
    positions of the same seed)."""
    base = {"policy": "adaswitch", "divergence": "forward_kl", "min_divergence": 0.0, "max_divergence": math.inf}
    configs = [{"name": BASELINE, **base}]
    configs += [{**base, "name": f"D = {d}", "divergence": d} for d in divergences if d != "forward_kl"]
    configs += [{**base, "name": f"F = {f:g}", "min_divergence": float(f)} for f in min_divergences]
    configs += [{**base, "name": f"A = {a:g}", "max_divergence": float(a)} for a in max_divergences]
    configs += [{**base, "name": c, "policy": c.replace(" ", "_")} for c in controls]
    return configs


def summarise_switch(runs: list[dict], configs: list[dict]) -> list[dict]:
    """One cell per config: means over seeds and paired per-seed differences against the default."""
    from adaswitch.demo.stats import paired

    def by_seed(name, key):
        return {r["seed"]: r[key] for r in runs if r["config"] == name}

    cells = []
    for c in configs:
        mine = [r for r in runs if r["config"] == c["name"]]
        if not mine:
            continue
        acc = [r["accuracy"] for r in mine]
        step = [r["step_accuracy"] for r in mine]
        cells.append(
            {
                **c,
                "accuracy": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "accuracies": acc,
                "step_accuracy": statistics.fmean(step),
                "step_accuracy_std": statistics.stdev(step) if len(step) > 1 else 0.0,
                "step_accuracies": step,
                "teacher_kl": _mean([r["teacher_kl"] for r in mine]),
                "switch_rate": _mean([r["switch_rate"] for r in mine]),
                "mean_switch_position": _mean([r["mean_switch_position"] for r in mine]),
                "teacher_token_fraction": _mean([r["teacher_token_fraction"] for r in mine]),
                "seconds_per_step": _mean([r["seconds_per_step"] for r in mine]),
                "seeds": [r["seed"] for r in mine],
                "vs_default": {
                    key: paired(by_seed(c["name"], key), by_seed(BASELINE, key))
                    for key in ("accuracy", "step_accuracy")
                },
            }
        )
    return cells


def format_switch_table(cells: list[dict]) -> str:
    """Markdown: one row per config; paired differences against the forward-KL default."""
    from adaswitch.demo.stats import format_paired

    head = ("setting", "accuracy %", "step accuracy %", "Δ accuracy vs default", "Δ step acc. vs default",
            "teacher KL", "switch rate", "mean switch pos", "teacher tokens %")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for c in cells:
        base = c["name"] == BASELINE
        lines.append("| " + " | ".join([
            c["name"],
            f"{100 * c['accuracy']:.1f} ± {100 * c['accuracy_std']:.1f}",
            f"{100 * c['step_accuracy']:.1f} ± {100 * c['step_accuracy_std']:.1f}",
            "-" if base else format_paired(c["vs_default"]["accuracy"]),
            "-" if base else format_paired(c["vs_default"]["step_accuracy"]),
            f"{c['teacher_kl']:.4f}",
            f"{c['switch_rate']:.2f}",
            f"{c['mean_switch_position']:.1f}",
            f"{100 * c['teacher_token_fraction']:.1f}",
        ]) + " |")
    return "\n".join(lines)


def run_switch_ablation(
    preset: str = "quick",
    output_dir: str | Path = "demo_out",
    *,
    teacher_dir=TEACHER_DIR,
    divergences=DIVERGENCES,
    min_divergences=MIN_DIVERGENCES,
    max_divergences=MAX_DIVERGENCES,
    seeds=None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Runs the switching-rule sweep at the shipped L, K; writes ablation_switch.json and
    ablation_switch.png; returns {"meta", "cells", "runs", "table"}."""
    from adaswitch.policies import AdaSwitch

    spec = get_preset(preset)
    configs = switch_configs(divergences, min_divergences, max_divergences)
    window, k = adaswitch_defaults()
    for c in configs:  # bad values are reported before any work
        AdaSwitch(window=window, k=k, divergence=c["divergence"], min_divergence=c["min_divergence"],
                  max_divergence=c["max_divergence"])
    seeds = _check_seeds(spec, seeds)
    workers = check_workers(default_workers() if workers is None else workers)
    settings = [
        Setting(name=c["name"], method=c["name"], tags={"config": c["name"]},
                overrides={"policy": c["policy"], "window": window, "k": k, "switch_divergence": c["divergence"],
                           "min_divergence": c["min_divergence"], "max_divergence": c["max_divergence"]},
                draws_from=BASELINE if c["policy"] == "random_switch" else None)
        for c in configs
    ]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def build(runs, ctx):
        return {
            "meta": {
                "preset": preset,
                **run_facts(),
                "adaswitch": {"window": window, "k": k},
                "budget": {"steps": spec.budget.steps, "batch_size": spec.budget.batch_size, "lr": spec.budget.lr},
                "teacher_accuracy": ctx.teacher_accuracy,
                "student_start_accuracy": ctx.student_accuracy,
                "student_start_step_accuracy": ctx.student_step_accuracy,
                "seeds": sorted({r["seed"] for r in runs}),
                "total_seconds": round(time.perf_counter() - started, 1),
                **ctx.info,
                "workers": workers,
                "threads_per_worker": 1,
            },
            "cells": summarise_switch(runs, configs),
            "runs": runs,
        }

    path = out / "ablation_switch.json"
    run_sweep(spec, settings, seeds, path=path, build=build, teacher_dir=teacher_dir, workers=workers,
              progress=progress, desc="switch ablation")
    return render_switch(path, out)


def render_switch(json_path: str | Path, output_dir: str | Path | None = None) -> dict:
    """The table (returned under "table") and the plot ablation_switch.png, from a written
    ablation_switch.json: what docs/ablation.md shows is generated from the committed file."""
    from adaswitch.demo.plots import plot_switch_ablation

    json_path = Path(json_path)
    result = json.loads(json_path.read_text())
    for c in result["cells"]:  # JSON null: the absolute trigger off
        c["max_divergence"] = math.inf if c["max_divergence"] is None else c["max_divergence"]
    out = Path(output_dir) if output_dir is not None else json_path.parent
    result["plot"] = str(plot_switch_ablation(result["cells"], out / "ablation_switch.png",
                                              start_step_accuracy=result["meta"]["student_start_step_accuracy"]))
    result["table"] = format_switch_table(result["cells"])
    return result


def _switch_main(args) -> int:
    if args.render:
        result = render_switch(args.render, args.output_dir if args.output_dir != "demo_out" else None)
    else:
        result = run_switch_ablation(
            "tiny" if args.tiny else "quick",
            args.output_dir,
            teacher_dir=args.teacher,
            divergences=tuple(args.divergences),
            min_divergences=tuple(args.min_divergences),
            max_divergences=tuple(args.max_divergences),
            seeds=tuple(args.seeds) if args.seeds else None,
            workers=args.workers,
            progress=not args.no_progress,
        )
    meta = result["meta"]
    print(
        f"\nSwitching-rule ablation ({meta['preset']}): AdaSwitch L = {meta['adaswitch']['window']}, K = "
        f"{meta['adaswitch']['k']:g}, {meta['budget']['steps']} steps x {meta['budget']['batch_size']} prompts, "
        f"seeds {meta['seeds']}, {meta['num_eval']} eval problems; student at start "
        f"{100 * meta['student_start_accuracy']:.1f}% (step accuracy {100 * meta['student_start_step_accuracy']:.1f}%)"
    )
    print(result["table"])
    print(f"plot: {result['plot']}; {meta['total_seconds']:.0f} s for {len(result['runs'])} runs")
    return 0


def main(argv=None) -> int:
    from adaswitch.demo.numerics import pinned_cpu_numerics

    with pinned_cpu_numerics():  # before the first CPU computation; the workers inherit it
        return _main(argv)


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaswitch.demo.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test (CI)")
    parser.add_argument("--output-dir", default="demo_out", help="where ablation.json goes")
    parser.add_argument("--teacher", default=str(TEACHER_DIR), help="teacher checkpoint directory")
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--ks", type=float, nargs="+", default=list(KS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--workers", type=int, default=None,
                        help="single-threaded runs at a time (default: the CPU cores available, at most 4; 1: in "
                        "this process); the results do not depend on it")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--switch", action="store_true",
                        help="the switching-rule sweep instead (divergence D, floor F, absolute trigger A at the "
                        "shipped L, K): writes ablation_switch.json and ablation_switch.png")
    parser.add_argument("--divergences", nargs="+", default=list(DIVERGENCES), help="--switch: the kinds D")
    parser.add_argument("--min-divergences", type=float, nargs="+", default=list(MIN_DIVERGENCES),
                        help="--switch: the floors F")
    parser.add_argument("--max-divergences", type=float, nargs="+", default=list(MAX_DIVERGENCES),
                        help="--switch: the absolute triggers A")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="--switch: only regenerate the table and the plot from a written ablation_switch.json")
    args = parser.parse_args(argv)
    if args.switch or args.render:
        return _switch_main(args)
    result = run_ablation(
        "tiny" if args.tiny else "quick",
        args.output_dir,
        teacher_dir=args.teacher,
        windows=tuple(args.windows),
        ks=tuple(args.ks),
        seeds=tuple(args.seeds) if args.seeds else None,
        workers=args.workers,
        progress=not args.no_progress,
    )
    meta, best = result["meta"], result["best"]
    print(
        f"\nAdaSwitch ablation ({meta['preset']}): {meta['budget']['steps']} steps x "
        f"{meta['budget']['batch_size']} prompts, seeds {meta['seeds']}, {meta['num_eval']} eval problems; "
        f"teacher {100 * meta['teacher_accuracy']:.1f}%, student after SFT "
        f"{100 * meta['student_after_sft_accuracy']:.1f}%"
    )
    print("accuracy % (mean ± std over seeds) and switch rate per window L (rows) and K (columns):")
    print(result["table"])
    print(f"best: window={best['window']}, k={best['k']:g} ({100 * best['accuracy']:.1f}%)")
    print(f"wrote {Path(args.output_dir) / 'ablation.json'} in {meta['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
