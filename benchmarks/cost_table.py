"""Writes the README's step-cost table from the committed step-cost benchmark (never typed).

    python benchmarks/cost_table.py          # rewrite the README blocks from results/distill_step_cpu.{csv,md}
    python benchmarks/cost_table.py --check  # exit 1 when a README block differs

Two blocks: the demo pair's (distill_step_cpu) and the real pair's (distill_step_real_cpu, bench_distill_step.py
--pair real), each between its own markers.

With floor rows in the CSV (bench_distill_step.py writes them) the table adds the floor's ratio to the
on-policy floor and ours / floor for the configurations that have one.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from readme_block import main as _main
from readme_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distill_step_cpu"
REAL_RESULTS = ROOT / "benchmarks" / "results" / "distill_step_real_cpu"
README = ROOT / "README.md"
BEGIN, END = "<!-- distill-step-cost:begin -->", "<!-- distill-step-cost:end -->"
REAL_BEGIN, REAL_END = "<!-- distill-step-cost-real:begin -->", "<!-- distill-step-cost-real:end -->"
ROWS = (  # the benchmark's configurations the README shows, in order
    "On-policy",
    "AdaSwitch, step (before)",
    "AdaSwitch, step + reuse",
    "AdaSwitch, G=4 speculative + reuse",
    "AdaSwitch, G=8 speculative + reuse",
    "AdaSwitch, defaults",
    "SKD, step (before)",
    "SKD, step + reuse",
    "SKD, G=4 + reuse",
    "SKD, defaults",
    "SeqKD (teacher), step (before)",
    "SeqKD (teacher), step + reuse",
    "SeqKD (teacher), defaults",
    "TRL DistillationTrainer (on-policy)",
)


def render(results: Path = RESULTS) -> str:
    """The README block from `results`.{csv,md}. A CSV with floor rows ("floor: <configuration>", see
    bench_distill_step.py) also gives the live-row teacher forwards and, for the configurations with a
    floor, the floor's step against the on-policy floor and ours / floor; an older CSV gives the older table."""
    with open(results.with_suffix(".csv"), newline="") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    machine = next(line for line in results.with_suffix(".md").read_text().splitlines() if line.startswith("CPU:"))
    floors = "floor: On-policy" in rows
    head = (f"From `benchmarks/results/{results.name}.csv`. {machine} \"before\" = a second teacher "
            "forward for the loss, \"reuse\" = the teacher's states from generation (the default).")
    if not floors:
        lines = [head, "",
                 "| step | vs our on-policy | vs TRL on-policy | teacher forwards / token | host syncs / step |",
                 "|---|---|---|---|---|"]
        for name in ROWS:
            r = rows[name]
            lines.append(f"| {name} | {float(r['vs_on_policy']):.2f}x | {float(r['vs_trl']):.2f}x | "
                         f"{float(r['teacher_forwards_per_token']):.3f} | {float(r['host_syncs_per_step']):.0f} |")
        return "\n".join(lines)
    lines = [head + " Floor: the same step with generation as raw model forwards (no engine), each model for "
             "the response positions the outputs need; \"floor vs on-policy floor\" is what any implementation "
             "pays on this machine, \"ours / floor\" what the engine adds. Live rows: teacher forwards counting "
             "only the rows not yet finished.", "",
             "| step | vs our on-policy | vs TRL on-policy | floor vs on-policy floor | ours / floor "
             "| teacher forwards / token | teacher forwards / token (live rows) | host syncs / step |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r, floor = rows[name], rows.get(f"floor: {name}")
        if floor is None:
            floor_ratio = ours_floor = "-"
        else:
            floor_ratio = f"{float(floor['vs_on_policy_floor']):.2f}x"
            ours_floor = f"{float(r['seconds_per_step']) / float(floor['seconds_per_step']):.2f}x"
        lines.append(f"| {name} | {float(r['vs_on_policy']):.2f}x | {float(r['vs_trl']):.2f}x | {floor_ratio} | "
                     f"{ours_floor} | {float(r['teacher_forwards_per_token']):.3f} | "
                     f"{float(r['teacher_forwards_per_token_live']):.3f} | {float(r['host_syncs_per_step']):.0f} |")
    return "\n".join(lines)


def updated(text: str) -> str:
    text = replace_block(text, BEGIN, END, render())
    if REAL_RESULTS.with_suffix(".csv").exists():
        text = replace_block(text, REAL_BEGIN, REAL_END, render(REAL_RESULTS))
    return text


def main(argv=None) -> int:
    return _main(argv, __doc__.splitlines()[0], README, updated,
                 "README's step-cost tables differ from benchmarks/results/distill_step*_cpu.csv; "
                 "run python benchmarks/cost_table.py")


if __name__ == "__main__":
    sys.exit(main())
