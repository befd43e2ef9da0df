"""The README's Benchmarks summary table is the rendering of the committed results CSVs (a hand edit or a
re-measured CSV without a rerun of benchmarks/summary_table.py fails here), and its numbers follow the CSVs."""

import csv
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import summary_table  # noqa: E402


def test_readme_block_is_rendered_from_the_committed_csvs():
    assert summary_table.main(["--check"]) == 0


def test_a_hand_edit_is_drift():
    text = summary_table.README.read_text()
    block = text[text.index(summary_table.BEGIN) : text.index(summary_table.END)]
    edited = text.replace(block, block.replace("×", "x", 1))
    assert edited != text and summary_table.updated(edited) != edited


def _rewrite(path: Path, change) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    for r in rows:
        change(r)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_numbers_come_from_the_csvs(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(summary_table.RESULTS, results)
    before = summary_table.render(results)
    assert before == summary_table.render()
    with open(results / "divergence_cpu_1thread.csv", newline="") as f:
        native = [float(r["speedup_vs_compiled"]) for r in csv.DictReader(f) if r["impl"] == "native"]
    low, high = min(native), max(native)
    assert 9.87 > high  # the rewrite below raises the top of the range

    def fast_native(r):
        if r["impl"] == "native" and r["kind"] == "tvd" and r["rows"] == "8" and r["vocab"] == "32000":
            r["speedup_vs_compiled"] = "9.87"

    _rewrite(results / "divergence_cpu_1thread.csv", fast_native)

    def two_runs(r):  # the adaswitch loss rows from another run than the baselines': a "rough" remark
        if r["provider"] == "adaswitch":
            r["date"], r["commit"] = "2026-01-01T00:00Z", "abc1234"

    _rewrite(results / "loss_cpu.csv", two_runs)
    after = summary_table.render(results)
    assert f"`torch.compile` {low:.2f}–9.87×" in after and f"{low:.2f}–{high:.2f}×" in before
    assert "rough" not in before and "rough" in after
