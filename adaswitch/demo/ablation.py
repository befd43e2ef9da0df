"""The AdaSwitch ablations: `python -m adaswitch.demo.ablation` (or `adaswitch demo --ablation`).

Distils the demo student with AdaSwitch for every window L in {4, 8, 16} and K in {1.5, 2, 3, 5}, on
the quick preset's budget and seeds, and ranks the settings by mean eval accuracy (ties: lower
teacher-forced KL). The winner is what `adaswitch.AdaSwitch()` ships as its default; docs/ablation.md
records the table. With --switch: the switching-rule sweep at the shipped L, K (the divergence D, the
floor F = min_divergence, the absolute trigger A = max_divergence), with paired per-seed differences
against the default; `--switch --render FILE` regenerates its table and plot from the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

from adaswitch.demo.build_teacher import TEACHER_DIR

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


def run_ablation(
    preset: str = "quick",
    output_dir: str | Path = "demo_out",
    *,
    teacher_dir=TEACHER_DIR,
    windows=WINDOWS,
    ks=KS,
    seeds=None,
    progress: bool = True,
) -> dict:
    """Runs the sweep; writes ablation.json; returns {"meta", "cells", "best", "table"}."""
    from tqdm.auto import tqdm

    from adaswitch.demo.experiment import quiet_library_bars, run_method
    from adaswitch.demo.run import PRESETS, cpu_name, git_commit, prepare_preset
    from adaswitch.policies import AdaSwitch

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    for w in windows:
        for k in ks:
            AdaSwitch(window=w, k=k)  # bad values are reported before any work
    spec = PRESETS[preset]
    seeds = spec.seeds if seeds is None else tuple(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with quiet_library_bars():
        ctx = prepare_preset(spec, teacher_dir=teacher_dir, progress=progress)
        jobs = [(w, k, s) for w in windows for k in ks for s in seeds]
        runs = []
        for w, k, s in tqdm(jobs, desc="ablation", unit="run", disable=not progress):
            overrides = {"policy": "adaswitch", "window": w, "k": k}
            result = run_method(ctx, "AdaSwitch", overrides, seed=s, budget=spec.budget)
            result.pop("model")
            runs.append({**result, "window": w, "k": k})

    cells = []
    for w in windows:
        for k in ks:
            mine = [r for r in runs if r["window"] == w and r["k"] == k]
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
    best = rank(cells)[0]
    result = {
        "meta": {
            "preset": preset,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git_commit(),
            "machine": cpu_name(),
            "seeds": list(seeds),
            "budget": {
                "steps": spec.budget.steps,
                "batch_size": spec.budget.batch_size,
                "lr": spec.budget.lr,
            },
            "teacher_accuracy": ctx.teacher_accuracy,
            "student_after_sft_accuracy": ctx.student_accuracy,
            "total_seconds": round(time.perf_counter() - started, 1),
            **ctx.info,
        },
        "cells": cells,
        "best": {"window": best["window"], "k": best["k"], "accuracy": best["accuracy"]},
    }
    (out / "ablation.json").write_text(json.dumps(result, indent=2, default=lambda v: None) + "\n")
    result["table"] = format_table(cells, best)
    return result


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
    progress: bool = True,
) -> dict:
    """Runs the switching-rule sweep at the shipped L, K; writes ablation_switch.json and
    ablation_switch.png; returns {"meta", "cells", "runs", "table"}."""
    from tqdm.auto import tqdm

    from adaswitch.demo.experiment import quiet_library_bars, random_switch_overrides, run_method
    from adaswitch.demo.run import PRESETS, adaswitch_defaults, prepare_preset
    from adaswitch.policies import AdaSwitch

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    configs = switch_configs(divergences, min_divergences, max_divergences)
    window, k = adaswitch_defaults()
    for c in configs:  # bad values are reported before any work
        AdaSwitch(window=window, k=k, divergence=c["divergence"], min_divergence=c["min_divergence"],
                  max_divergence=c["max_divergence"])
    spec = PRESETS[preset]
    seeds = spec.seeds if seeds is None else tuple(seeds)
    if not seeds:
        raise ValueError("seeds must not be empty")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    path = out / "ablation_switch.json"
    with quiet_library_bars():
        ctx = prepare_preset(spec, teacher_dir=teacher_dir, progress=progress)
        runs = []
        # seed by seed (the default first: the random control draws from its switch positions); the JSON is
        # rewritten after every seed, so an interrupted sweep leaves complete seeds
        for s in tqdm(seeds, desc="switch ablation (seeds)", unit="seed", disable=not progress):
            counts = None
            for c in tqdm(configs, desc=f"seed {s}", unit="run", leave=False, disable=not progress):
                overrides = {"policy": c["policy"], "window": window, "k": k, "switch_divergence": c["divergence"],
                             "min_divergence": c["min_divergence"], "max_divergence": c["max_divergence"]}
                if c["policy"] == "random_switch":
                    if counts is None:
                        raise ValueError("the random switch control needs the default's run of the same seed")
                    overrides.update(random_switch_overrides(counts))
                result = run_method(ctx, c["name"], overrides, seed=s, budget=spec.budget)
                result.pop("model")
                if c["name"] == BASELINE:
                    counts = result["switch_position_counts"]
                runs.append({**result, "config": c["name"]})
            path.write_text(json.dumps(_switch_result(runs, configs, preset, spec, ctx, window, k, started),
                                       indent=2, default=lambda v: None) + "\n")
    return render_switch(path, out)


def _switch_result(runs, configs, preset, spec, ctx, window, k, started) -> dict:
    from adaswitch.demo.run import cpu_name, git_commit

    cells = summarise_switch(runs, configs)
    return {
        "meta": {
            "preset": preset,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": git_commit(),
            "machine": cpu_name(),
            "adaswitch": {"window": window, "k": k},
            "budget": {"steps": spec.budget.steps, "batch_size": spec.budget.batch_size, "lr": spec.budget.lr},
            "teacher_accuracy": ctx.teacher_accuracy,
            "student_start_accuracy": ctx.student_accuracy,
            "student_start_step_accuracy": ctx.student_step_accuracy,
            "seeds": sorted({r["seed"] for r in runs}),
            "total_seconds": round(time.perf_counter() - started, 1),
            **ctx.info,
        },
        "cells": cells,
        "runs": runs,
    }


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
    parser = argparse.ArgumentParser(prog="python -m adaswitch.demo.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test (CI)")
    parser.add_argument("--output-dir", default="demo_out", help="where ablation.json goes")
    parser.add_argument("--teacher", default=str(TEACHER_DIR), help="teacher checkpoint directory")
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--ks", type=float, nargs="+", default=list(KS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
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
