"""The AdaSwitch ablation: `python -m adaswitch.demo.ablation` (or `adaswitch demo --ablation`).

Distils the demo student with AdaSwitch for every window L in {4, 8, 16} and K in {1.5, 2, 3, 5}, on
the quick preset's budget and seeds, and ranks the settings by mean eval accuracy (ties: lower
teacher-forced KL). The winner is what `adaswitch.AdaSwitch()` ships as its default; docs/ablation.md
records the table.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaswitch.demo.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds: a smoke test (CI)")
    parser.add_argument("--output-dir", default="demo_out", help="where ablation.json goes")
    parser.add_argument("--teacher", default=str(TEACHER_DIR), help="teacher checkpoint directory")
    parser.add_argument("--windows", type=int, nargs="+", default=list(WINDOWS))
    parser.add_argument("--ks", type=float, nargs="+", default=list(KS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
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
