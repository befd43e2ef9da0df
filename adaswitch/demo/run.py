"""`adaswitch demo`: every distillation method on the embedded arithmetic task, one table.

    adaswitch demo                 # quick preset (the default; minutes on 2 CPU cores)
    adaswitch demo --full          # the shipped stronger student, 120 steps, all 500 eval problems
    adaswitch demo --workers 1     # every run in this process (default: one per core, at most 4)
    adaswitch demo --tiny          # seconds; what CI runs
    adaswitch demo --ablation      # the window x k sweep that sets AdaSwitch's defaults
    python -m adaswitch.demo ...   # the same

Steps: load the shipped Qwen2-style teacher and a Llama-style student (1/8 of its size, SFT-ed on the
task's worked completions: the quick preset loads the shipped weaker one, assets/student_quick, --full
the shipped stronger one, --tiny builds and SFTs a tiny one), distil copies of that student with each
method, and with AdaSwitch's two controls (fixed and random switch), for the same number of steps on
the same prompts, over several seeds; print the table (final-answer and per-step accuracy) and the
paired per-seed differences against on-policy, SKD and AdaSwitch, write results.json and the plots to
--output-dir. See docs/demo.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from adaswitch.demo.build_teacher import STUDENT_DIR, TEACHER_DIR
from adaswitch.demo.experiment import ALL_METHODS, ON_POLICY, SKD_NAME
from adaswitch.demo.presets import (
    SKD_TOP_K,
    adaswitch_defaults,
    check_workers,
    default_workers,
    get_preset,
    prepare_preset,
    run_facts,
)

PAIRED_BASELINES = (ON_POLICY, SKD_NAME, "AdaSwitch")  # AdaSwitch: what its controls are measured against
PAIRED_KEYS = ("accuracy", "step_accuracy", "teacher_nll")
LOWER_IS_BETTER = ("teacher_nll",)  # paired as baseline - method, so that + is better for every key


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method (in METHOD_NAMES order): means over seeds, accuracy std, overhead vs on-policy,
    and paired per-seed differences against on-policy, SKD and AdaSwitch (`paired[baseline][metric]`; for a
    metric where lower is better, baseline - method)."""
    from adaswitch.demo.stats import paired

    def by_seed(name, key):
        return {r["seed"]: r.get(key, math.nan) for r in runs if r["method"] == name}

    def difference(name, baseline, key):
        a, b = by_seed(name, key), by_seed(baseline, key)
        return paired(b, a) if key in LOWER_IS_BETTER else paired(a, b)

    rows = []
    for name in ALL_METHODS:
        mine = [r for r in runs if r["method"] == name]
        if not mine:
            continue
        acc = [r["accuracy"] for r in mine]
        step = [r["step_accuracy"] for r in mine if not math.isnan(r.get("step_accuracy", math.nan))]

        def mean(key, mine=mine):
            values = [r[key] for r in mine if key in r and not math.isnan(r[key])]
            return statistics.fmean(values) if values else math.nan

        rows.append(
            {
                "method": name,
                "accuracy": statistics.fmean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "accuracies": acc,
                "step_accuracy": statistics.fmean(step) if step else math.nan,
                "step_accuracy_std": statistics.stdev(step) if len(step) > 1 else 0.0,
                "step_accuracies": step,
                "teacher_kl": mean("teacher_kl"),
                "teacher_nll": mean("teacher_nll"),
                "switch_rate": mean("switch_rate"),
                "mean_switch_position": mean("mean_switch_position"),
                "teacher_token_fraction": mean("teacher_token_fraction"),
                "response_tokens_per_step": mean("response_tokens_per_step"),
                "seconds_per_step": mean("seconds_per_step"),
                "seeds": [r["seed"] for r in mine],
                "paired": {
                    b: {key: difference(name, b, key) for key in PAIRED_KEYS}
                    for b in PAIRED_BASELINES
                    if b != name and any(r["method"] == b for r in runs)
                },
            }
        )
    base = next((r["seconds_per_step"] for r in rows if r["method"] == ON_POLICY), math.nan)
    for r in rows:
        r["overhead_vs_on_policy"] = r["seconds_per_step"] / base if base > 0 else math.nan
    return rows


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value * scale, spec)


def _has(rows: list[dict], key: str) -> bool:
    return any(not math.isnan(r.get(key, math.nan)) for r in rows)


def is_chat_task(rows: list[dict]) -> bool:
    """Rows of the real pair (teacher NLL of the student's own answers, no per-step accuracy)."""
    return _has(rows, "teacher_nll") and not _has(rows, "step_accuracy")


TABLE_COLUMNS = (
    "method",
    "accuracy % (mean ± std)",
    "step accuracy %",
    "teacher KL",
    "switch rate",
    "mean switch pos",
    "teacher tokens %",
    "s / step",
    "vs on-policy",
)
# the real pair: accuracy on the checkable prompts; KL on the teacher's answers; teacher NLL of the student's own
CHAT_TABLE_COLUMNS = (
    "method",
    "checkable accuracy % (mean ± std)",
    "teacher-forced KL",
    "teacher NLL of own answers",
    *TABLE_COLUMNS[4:],
)


def format_table(rows: list[dict]) -> str:
    """A Markdown table (so it pastes into the README as it is)."""
    chat = is_chat_task(rows)
    columns = CHAT_TABLE_COLUMNS if chat else TABLE_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        quality = [_fmt(r["teacher_kl"], ".4f"), _fmt(r.get("teacher_nll"), ".3f")] if chat else [
            "-" if math.isnan(r.get("step_accuracy", math.nan))
            else f"{100 * r['step_accuracy']:.1f} ± {100 * r['step_accuracy_std']:.1f}",
            _fmt(r["teacher_kl"], ".4f"),
        ]
        cells = [
            r["method"],
            f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f}",
            *quality,
            _fmt(r["switch_rate"], ".2f"),
            _fmt(r["mean_switch_position"], ".1f"),
            _fmt(r["teacher_token_fraction"], ".1f", 100),
            _fmt(r["seconds_per_step"], ".3f"),
            _fmt(r["overhead_vs_on_policy"], ".2f") + ("x" if not math.isnan(r["overhead_vs_on_policy"]) else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# per paired metric: its column label and how format_paired shows it (scale to points / nats, digits)
PAIRED_LABELS = {"accuracy": ("Δ accuracy", 100.0, 1), "step_accuracy": ("Δ step acc.", 100.0, 1),
                 "teacher_nll": ("teacher NLL gain", 1.0, 3)}


PAIRED_COLUMNS = ("method", *(f"{PAIRED_LABELS[k][0]} vs {label}" for label in ("on-policy", "SKD", "AdaSwitch")
                               for k in ("accuracy", "step_accuracy")))  # the arithmetic demo's
BASELINE_LABELS = {ON_POLICY: "on-policy", SKD_NAME: "SKD", "AdaSwitch": "AdaSwitch"}


def paired_keys(rows: list[dict]) -> tuple[str, str]:
    return ("accuracy", "teacher_nll") if is_chat_task(rows) else ("accuracy", "step_accuracy")


def format_paired_table(rows: list[dict]) -> str:
    """Markdown: per method, the mean ± std over seeds of its per-seed difference (points; nats for the
    teacher NLL, as baseline - method so that + is better) from on-policy, SKD and AdaSwitch, the seeds it
    wins, and * where a 95% paired t-test says the difference is not noise."""
    from adaswitch.demo.stats import format_paired

    keys = paired_keys(rows)
    columns = ["method"] + [f"{PAIRED_LABELS[k][0]} vs {BASELINE_LABELS[b]}" for b in PAIRED_BASELINES for k in keys]
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        cells = [r["method"]]
        for b in PAIRED_BASELINES:
            for key in keys:
                _, scale, digits = PAIRED_LABELS[key]
                cells.append(format_paired(r.get("paired", {}).get(b, {}).get(key), scale=scale, digits=digits))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_demo(
    preset: str = "quick",
    output_dir: str | Path = "demo_out",
    *,
    teacher_dir=TEACHER_DIR,
    student_dir=None,
    window: int | None = None,
    k: float | None = None,
    methods: tuple[str, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Runs the demo and writes results.json and the plots; returns the results dict. `workers`: how
    many single-threaded runs at a time (default: the CPU cores available, at most 4; 1 = in this
    process); the results do not depend on it."""
    from tqdm.auto import tqdm

    from adaswitch.demo.experiment import quiet_library_bars
    from adaswitch.demo.pool import RunPool, single_threaded
    from adaswitch.policies import AdaSwitch
    from adaswitch.train.atomic import write_file

    spec = get_preset(preset)
    methods = spec.methods if methods is None else tuple(methods)
    unknown = [m for m in methods if m not in spec.methods]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty subset of {spec.methods}, got {methods!r}")
    seeds = spec.seeds if seeds is None else tuple(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be non-negative ints, got {seeds!r}")
    if "Random switch" in methods and "AdaSwitch" not in methods:
        raise ValueError("methods: 'Random switch' draws from AdaSwitch's switch positions; include 'AdaSwitch'")
    workers = check_workers(default_workers() if workers is None else workers)
    methods = tuple(m for m in ALL_METHODS if m in methods)  # AdaSwitch before its random control
    default_window, default_k = adaswitch_defaults()
    window = default_window if window is None else window
    k = default_k if k is None else k
    AdaSwitch(window=window, k=k)  # a bad window / k is reported before any work
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    say = tqdm.write if progress else print
    if spec.pair == "real":  # built here, once, before the workers load it
        from adaswitch.demo.build_real import ensure_pair

        ensure_pair(progress=progress, log=say)
    with single_threaded(), quiet_library_bars(), \
            RunPool(spec, workers=workers, teacher_dir=teacher_dir, student=student_dir) as pool:
        say(f"[adaswitch demo] preset={preset}: loading the teacher and the student "
            f"({workers} single-threaded run{'s' if workers > 1 else ''} at a time) ...")
        ctx = prepare_preset(spec, teacher_dir=teacher_dir, progress=progress, student=student_dir)
        results = _run(spec, ctx, pool, methods, seeds, window, k, out, progress, say)
    results["meta"]["workers"] = workers
    results["meta"]["threads_per_worker"] = 1
    results["meta"]["total_seconds"] = round(time.perf_counter() - started, 1)
    results["meta"]["time_split"] = time_split(results["runs"], results["meta"]["total_seconds"], workers)
    write_file(out / "results.json", json.dumps(_json_safe(results), indent=2) + "\n")
    results["table"] = format_table(results["results"])
    results["paired_table"] = format_paired_table(results["results"])
    return results


def time_split(runs: list[dict], total_seconds: float, workers: int) -> dict:
    """Where the demo's wall time goes: the runs' CPU seconds in training and in the eval generations (summed
    over runs; divided by `workers` they are wall seconds) and the rest (loading, the start's evaluations,
    traces, plots, process start-up)."""
    train = sum(r.get("train_wall_seconds", 0.0) for r in runs)
    evals = sum(r.get("eval_seconds", 0.0) for r in runs)
    return {"runs_train_seconds": round(train, 1), "runs_eval_seconds": round(evals, 1),
            "other_wall_seconds": round(total_seconds - (train + evals) / workers, 1)}


def demo_jobs(methods, seeds, *, window: int, k: float, skd_top_k: int = SKD_TOP_K,
              max_divergence: float | None = None) -> list:
    """One job per (method, seed), method by method; each "Random switch" run draws from the AdaSwitch
    run of its seed, and the first seed's AdaSwitch student comes back for the switch trace."""
    from adaswitch.demo.experiment import method_overrides
    from adaswitch.demo.pool import Job

    jobs, index = [], {}
    for name in methods:
        for seed in seeds:
            index[(name, seed)] = len(jobs)
            if name == "Random switch":  # its switch positions are added once AdaSwitch's run is done
                overrides, after = {"policy": "random_switch", "window": window, "k": k}, index[("AdaSwitch", seed)]
            else:
                overrides = method_overrides(name, window=window, k=k, skd_top_k=skd_top_k,
                                             max_divergence=max_divergence)
                after = None
            jobs.append(Job(name=f"{name}, seed {seed}", method=name, seed=seed, overrides=overrides, after=after,
                            keep_model=name == "AdaSwitch" and seed == seeds[0]))
    return jobs


def _run(spec, ctx, pool, methods, seeds, window, k, out, progress, say) -> dict:
    from adaswitch.demo.experiment import switch_trace
    from adaswitch.demo.stats import binomial_std

    say(
        f"[adaswitch demo] teacher {100 * ctx.teacher_accuracy:.1f}%, student at start "
        f"{100 * ctx.student_accuracy:.1f}% on {ctx.info.get('num_eval_checkable', len(ctx.eval))} checked eval "
        "problems"
    )
    jobs = demo_jobs(methods, seeds, window=window, k=k, skd_top_k=spec.skd_top_k, max_divergence=spec.max_divergence)
    runs = pool.run(ctx, jobs, progress=progress, desc="distilling")
    adaswitch_model = None
    for run in runs:
        if "state_dict" in run:
            adaswitch_model = copy.deepcopy(ctx.student)
            adaswitch_model.load_state_dict(run.pop("state_dict"))
            adaswitch_model.eval()

    rows = summarise(runs)
    trace_kw = dict(
        window=window,
        k=k,
        num_prompts=min(spec.trace_prompts, len(ctx.eval)),
        max_new_tokens=spec.budget.max_new_tokens,
    )
    start = REAL_PLOT_LABELS["start_label"] if spec.pair == "real" else "student after SFT"
    traces = {start: switch_trace(ctx, ctx.student, **trace_kw)}
    if adaswitch_model is not None:
        traces[f"after AdaSwitch distillation (seed {seeds[0]})"] = switch_trace(ctx, adaswitch_model, **trace_kw)
    plots = _write_plots(out, rows, ctx, traces, window=window, k=k, max_position=spec.budget.max_new_tokens)
    return {
        "meta": {
            "preset": spec.name,
            **run_facts(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work sharing the cores
            "seeds": list(seeds),
            "budget": asdict(spec.budget),
            "adaswitch": {"window": window, "k": k, "max_divergence": spec.max_divergence},
            "skd_top_k": spec.skd_top_k,
            "teacher_accuracy": ctx.teacher_accuracy,
            "student_after_sft_accuracy": ctx.student_accuracy,
            "student_start_teacher_kl": ctx.student_teacher_kl,
            "student_after_sft_step_accuracy": ctx.student_step_accuracy,
            "student_start_teacher_nll": ctx.student_teacher_nll,
            # the sampling noise of one accuracy on this eval set (binomial std at the starting student's level)
            "eval_binomial_std": binomial_std(ctx.student_accuracy,
                                              ctx.info.get("num_eval_checkable", len(ctx.eval))),
            **ctx.info,
            "plots": [p.name for p in plots],
        },
        "results": rows,
        "runs": runs,
    }


REAL_PLOT_LABELS = {"start_label": "student at start (pruned + healed)", "ylabel": "checkable accuracy"}


def _write_plots(out, rows, ctx, traces, *, window, k, max_position) -> list[Path]:
    from adaswitch.demo.plots import plot_accuracy, plot_divergence_trace, plot_switch_histogram

    paths = [
        plot_accuracy(
            rows,
            out / "accuracy.png",
            teacher_accuracy=ctx.teacher_accuracy,
            start_accuracy=ctx.student_accuracy,
            **(REAL_PLOT_LABELS if is_chat_task(rows) else {}),
        )
    ]
    paths.append(
        plot_switch_histogram(
            {label: t["switch_position"] for label, t in traces.items()},
            out / "switch_positions.png",
            max_position=max_position,
        )
    )
    trace = next(iter(traces.values()))  # the starting student's
    # The clearest example: a row that switched late enough to show the window filling up.
    candidates = [i for i, p in enumerate(trace["switch_position"]) if p >= window + 2]
    candidates = candidates or [i for i, p in enumerate(trace["switch_position"]) if p >= 0] or [0]
    row = candidates[0]
    n = trace["lengths"][row]
    paths.append(
        plot_divergence_trace(
            trace["divergence"][row][:n],
            trace["tokens"][row][:n],
            trace["switch_position"][row],
            out / "divergence_trace.png",
            window=window,
            k=k,
            prompt=trace["prompts"][row],
        )
    )
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaswitch demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="seconds: a smoke test (CI)")
    size.add_argument(
        "--full", action="store_true", help="the shipped stronger student, 120 steps, all eval problems (docs/demo.md)"
    )
    size.add_argument(
        "--real", action="store_true", help="the real pair: SmolLM2-135M-Instruct and its pruned, healed student on "
        "chat prompts (built once by python -m adaswitch.demo.build_real; docs/demo_real.md)"
    )
    parser.add_argument(
        "--ablation",
        action="store_true",
        help="run the AdaSwitch window x K sweep instead (python -m adaswitch.demo.ablation; takes its "
        "--windows/--ks; with --tiny: seconds)",
    )
    parser.add_argument("--output-dir", default="demo_out", help="where results.json and the plots go")
    parser.add_argument("--teacher", default=str(TEACHER_DIR), help="teacher checkpoint directory")
    parser.add_argument(
        "--student",
        default=None,
        help=f"starting student checkpoint directory (default: the preset's; --full: {STUDENT_DIR})",
    )
    parser.add_argument("--window", type=int, default=None, help="AdaSwitch L (default: the shipped default)")
    parser.add_argument("--k", type=float, default=None, help="AdaSwitch K (default: the shipped default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=ALL_METHODS,
        metavar="METHOD",
        help=f"subset of the preset's methods: {', '.join(ALL_METHODS)}",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="single-threaded runs at a time, each in its own process (default: the CPU cores available, "
        "at most 4; 1: in this process); the results do not depend on it",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv=None) -> int:
    from adaswitch.demo.numerics import pinned_cpu_numerics

    with pinned_cpu_numerics():  # before the first CPU computation; the workers inherit it
        return _main(argv)


def _main(argv) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.ablation:
        from adaswitch.demo import ablation

        if args.full or args.real or args.window is not None or args.k is not None or args.methods or args.student:
            parser.error("--ablation takes --tiny, --seeds, --output-dir, --teacher, --workers and the sweep's "
                         "options (python -m adaswitch.demo.ablation --help)")
        forwarded = ["--output-dir", args.output_dir, "--teacher", args.teacher, *rest]
        forwarded += ["--tiny"] if args.tiny else []
        forwarded += ["--seeds", *map(str, args.seeds)] if args.seeds else []
        forwarded += ["--no-progress"] if args.no_progress else []
        forwarded += ["--workers", str(args.workers)] if args.workers is not None else []
        return ablation.main(forwarded)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    preset = "tiny" if args.tiny else "full" if args.full else "real" if args.real else "quick"
    if args.real and (args.student or args.teacher != str(TEACHER_DIR)):
        parser.error("--real takes its pair from python -m adaswitch.demo.build_real (no --teacher / --student)")
    results = run_demo(
        preset,
        args.output_dir,
        teacher_dir=args.teacher,
        student_dir=args.student,
        window=args.window,
        k=args.k,
        methods=tuple(args.methods) if args.methods else None,
        seeds=tuple(args.seeds) if args.seeds else None,
        workers=args.workers,
        progress=not args.no_progress,
    )
    meta = results["meta"]
    print()
    if args.real:
        print(
            f"adaswitch demo (real): teacher {meta['teacher_architecture']} {meta['teacher_parameters']:,} params "
            f"{100 * meta['teacher_accuracy']:.1f}% checkable, student {meta['student_parameters']:,} params "
            f"{100 * meta['student_after_sft_accuracy']:.1f}% (teacher-forced KL "
            f"{meta['student_start_teacher_kl']:.4f}, "
            f"teacher NLL of its answers {meta['student_start_teacher_nll']:.3f}) at start; "
            f"{meta['budget']['steps']} steps x {meta['budget']['batch_size']} prompts per method, seeds "
            f"{meta['seeds']}, {meta['num_eval']} eval prompts ({meta['num_eval_checkable']} checkable)"
        )
    else:
        print(
        f"adaswitch demo ({meta['preset']}): teacher {meta['teacher_architecture']} "
        f"{meta['teacher_parameters']:,} params {100 * meta['teacher_accuracy']:.1f}%, student "
        f"{meta['student_architecture']} {meta['student_parameters']:,} params "
        f"{100 * meta['student_after_sft_accuracy']:.1f}% (step accuracy "
        f"{100 * meta['student_after_sft_step_accuracy']:.1f}%, teacher KL "
        f"{meta['student_start_teacher_kl']:.4f}) at start; {meta['budget']['steps']} steps x "
        f"{meta['budget']['batch_size']} prompts per method, seeds {meta['seeds']}, "
        f"{meta['num_eval']} eval problems"
        )
    print(results["table"])
    print(
        "\npaired per-seed differences (points; mean ± std over seeds, seeds won, * = 95% paired t-test; "
        f"eval sampling std of one accuracy: {100 * meta['eval_binomial_std']:.1f} points):"
    )
    print(results["paired_table"])
    print(
        f"\nwrote {Path(args.output_dir) / 'results.json'} and {', '.join(meta['plots'])} "
        f"in {meta['total_seconds']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
