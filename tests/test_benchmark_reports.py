"""The committed benchmark reports are what their scripts render from the committed rows."""

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_loss_report_is_rendered_from_its_csv(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import loss_ratios
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with open(RESULTS / "loss_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loss_ratios.write_markdown(rows, tmp_path / "loss_cpu.md", "loss_cpu.csv")
    assert (tmp_path / "loss_cpu.md").read_text() == (RESULTS / "loss_cpu.md").read_text(), (
        "benchmarks/results/loss_cpu.md differs from its CSV: run "
        "`python benchmarks/loss_ratios.py --table benchmarks/results/loss_cpu.csv --md benchmarks/results/loss_cpu.md`"
    )


def test_readme_cost_table_is_rendered_from_the_step_benchmark():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cost_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert cost_table.main(["--check"]) == 0
