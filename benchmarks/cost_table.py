"""Writes the README's step-cost tables from the committed step-cost benchmark (never typed).

    python benchmarks/cost_table.py          # rewrite the README blocks from results/distill_step*_cpu.{csv,md}
    python benchmarks/cost_table.py --check  # exit 1 when a README block differs

One block per pair of bench_distill_step.py (demo, real, deep), each between its own markers: per policy, the
step of every fixed draft length G (step and speculative guidance), of lookahead="auto" and of its floor,
each against our on-policy step of the same run, and auto against the fastest fixed setting that writes the
same tokens.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from readme_block import main as _main
from readme_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PAIRS = {  # results name -> README markers' tag
    "distill_step_cpu": "distill-step-cost",
    "distill_step_real_cpu": "distill-step-cost-real",
    "distill_step_deep_cpu": "distill-step-cost-deep",
}
POLICIES = ("AdaSwitch", "SKD", "SeqKD (teacher)")
COLUMNS = (  # (header, configuration name suffix)
    ("G=0", "G=0"), ("G=2", "G=2"), ("G=4", "G=4"), ("G=8", "G=8"),
    ("G=2 spec.", "G=2 speculative"), ("G=4 spec.", "G=4 speculative"), ("G=8 spec.", "G=8 speculative"),
    ("auto (default)", "auto"), ("auto spec.", "auto speculative"),
)
TRL = "TRL DistillationTrainer (on-policy)"


def _ratio(row) -> str:
    return "-" if row is None else f"{float(row['vs_on_policy']):.2f}x"


def render(results: Path) -> str:
    """The README block from `results`.{csv,md}."""
    with open(results.with_suffix(".csv"), newline="") as f:
        rows = {r["config"]: r for r in csv.DictReader(f)}
    machine = next(line for line in results.with_suffix(".md").read_text().splitlines() if line.startswith("CPU:"))
    lines = [f"From `benchmarks/results/{results.name}.csv`. {machine} Each cell: seconds per step against our "
             "on-policy step in the same run; \"spec.\" = speculative guidance (the teacher's distribution, other "
             "draws than step mode's); \"auto\" = the defaults (lookahead=\"auto\", guidance=\"auto\": step mode's "
             "tokens), \"auto spec.\" = lookahead=\"auto\" with guidance=\"speculative\"; \"auto / fastest\" = auto "
             "against the fastest fixed G with the same tokens (step guidance); floor = the G=0 step with "
             "generation as raw model forwards (what any implementation pays here).", "",
             "| policy | " + " | ".join(h for h, _ in COLUMNS) + " | auto / fastest | auto's mean G | floor |",
             "|---|" + "---|" * (len(COLUMNS) + 3)]
    for policy in POLICIES:
        cells = [_ratio(rows.get(f"{policy}, {suffix}")) for _, suffix in COLUMNS]
        fixed = [r for n, r in rows.items() if n.startswith(f"{policy}, G=") and not n.endswith("speculative")]
        auto, floor = rows.get(f"{policy}, auto"), rows.get(f"floor: {policy}, G=0")
        vs_fastest = "-"
        if fixed and auto is not None:
            fastest = min(float(r["seconds_per_step"]) for r in fixed)
            vs_fastest = f"{float(auto['seconds_per_step']) / fastest:.2f}x"
        mean_g = "-" if auto is None else f"{float(auto['mean_lookahead']):.2f}"
        floor_ratio = "-" if floor is None else f"{float(floor['vs_on_policy_floor']):.2f}x"
        lines.append(f"| {policy} | " + " | ".join(cells) + f" | {vs_fastest} | {mean_g} | {floor_ratio} |")
    ratio = rows.get("floor: teacher decode"), rows.get("floor: student decode")
    tail = []
    if TRL in rows:
        trl = float(rows["On-policy"]["vs_trl"])
        tail.append(f"Our on-policy step is {trl:.2f}x TRL's `DistillationTrainer` step.")
    if all(r is not None for r in ratio):
        cost = float(ratio[0]["generation"]) / float(ratio[1]["generation"])
        tail.append(f"A teacher decode forward costs {cost:.1f}x a student one here.")
    if tail:
        lines += ["", " ".join(tail)]
    return "\n".join(lines)


def updated(text: str) -> str:
    for name, tag in PAIRS.items():
        results = RESULTS / name
        if results.with_suffix(".csv").exists():
            text = replace_block(text, f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->", render(results))
    return text


def main(argv=None) -> int:
    return _main(argv, __doc__.splitlines()[0], README, updated,
                 "README's step-cost tables differ from benchmarks/results/distill_step*_cpu.csv; "
                 "run python benchmarks/cost_table.py")


if __name__ == "__main__":
    sys.exit(main())
