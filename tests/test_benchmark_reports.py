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


def _benchmarks():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_distill_step
        import cost_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return bench_distill_step, cost_table


def test_floor_positions_follow_each_policy_s_reads():
    """The floor runs each model only as far as the outputs need: AdaSwitch's student until the last row's
    switch (a row that never switched: its end), the others for the longest row."""
    import torch

    from adaswitch.policies import SKD, AdaSwitch, Student, Teacher

    bench, _ = _benchmarks()
    lengths = torch.tensor([5, 9, 3])
    switched = torch.tensor([2, 4, 0])
    assert bench.positions_needed(AdaSwitch(), lengths, switched) == (5, 9)
    assert bench.positions_needed(AdaSwitch(), lengths, torch.tensor([2, -1, 0])) == (9, 9)
    assert bench.positions_needed(Student(), lengths, torch.full((3,), -1)) == (9, 0)
    assert bench.positions_needed(Teacher(), lengths, torch.full((3,), -1)) == (0, 9)
    assert bench.positions_needed(SKD(), lengths, torch.full((3,), -1)) == (9, 9)


def test_floor_teacher_forwards_count_live_rows():
    """Per teacher forward the live-row column counts the rows not yet finished; the old column all rows."""
    import torch

    bench, _ = _benchmarks()
    rows = [dict(lengths=torch.tensor([2, 4]), positions=(0, 4), loss_forward=False),
            dict(lengths=torch.tensor([1, 3]), positions=(0, 3), loss_forward=True)]
    extra = bench.floor_extra(rows, batch=2, engine_extra=None)
    # forwards: 4 + (3 + 1 loss) = 8 calls x 2 rows over 10 tokens; live: (2 + 4) + (1 + 3 + 2) = 12 rows
    assert extra["teacher_forwards_per_token"] == 8 * 2 / 10
    assert extra["teacher_forwards_per_token_live"] == 12 / 10


def _step_rows(floors: bool) -> list[dict]:
    """A results table as bench_distill_step writes it (on-policy, AdaSwitch at G=0 and G=4 and auto, floors)."""
    base = dict(lookahead=0, guidance="step", generation=0.1, teacher_forward_loss=0.0, student_fwd_bwd_opt=0.05,
                vs_trl=0.5, teacher_forwards_per_token=1.5, teacher_forwards_per_token_live=1.0,
                host_syncs_per_step=9, teacher_token_fraction=0.5, teacher_states_reused=1.0,
                student_forwards_per_generation=41, teacher_forwards_per_generation=41, student_forwards_per_token=1.0,
                mean_lookahead=0.0)
    rows = [dict(base, config="On-policy", seconds_per_step=0.2, vs_on_policy=1.0, vs_on_policy_floor=2.0),
            dict(base, config="AdaSwitch, G=0", seconds_per_step=0.4, vs_on_policy=2.0, vs_on_policy_floor=4.0),
            dict(base, config="AdaSwitch, G=4", lookahead=4, seconds_per_step=0.3, vs_on_policy=1.5,
                 vs_on_policy_floor=3.0),
            dict(base, config="AdaSwitch, auto", lookahead="auto", guidance="auto", seconds_per_step=0.32,
                 vs_on_policy=1.6, vs_on_policy_floor=3.2, mean_lookahead=2.5)]
    if floors:
        rows += [dict(base, config="floor: On-policy", seconds_per_step=0.1, vs_on_policy=0.5, vs_on_policy_floor=1.0,
                      generation=0.04),
                 dict(base, config="floor: AdaSwitch, G=0", seconds_per_step=0.16, vs_on_policy=0.8,
                      vs_on_policy_floor=1.6, generation=0.08)]
    return rows


def test_step_report_puts_floor_ratios_in_their_own_section():
    bench, _ = _benchmarks()
    text = bench.markdown(_step_rows(floors=True), "CPU: test")
    main, floor = text.split("## Floor")
    assert "| floor: " not in main  # floor rows are not configurations
    # ours / floor (step 0.4 / 0.16, generation 0.1 / 0.08), floor vs on-policy floor 1.6
    assert "| AdaSwitch, G=0 | 2.50x | 1.25x | 1.60x | 2.00x |" in floor
    # auto (0.32 s) against the fastest fixed setting (G=4, 0.3 s)
    assert "| AdaSwitch, auto | AdaSwitch, G=4 | 1.50x | 1.60x | 1.07x | 2.50 |" in main
    assert "## Floor" not in bench.markdown(_step_rows(floors=False), "CPU: test")


def test_cost_table_renders_the_grid_auto_and_floor(tmp_path):
    _, cost_table = _benchmarks()
    rows = _step_rows(floors=True)
    results = tmp_path / "step"
    with open(results.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    results.with_suffix(".md").write_text("# x\n\nCPU: test machine\n")
    text = cost_table.render(results)
    # G=0 2.00x, G=2 absent, G=4 1.50x, ..., auto 1.60x, auto / fastest 0.32 / 0.3, mean G 2.50, floor 1.60x
    assert "| AdaSwitch | 2.00x | - | 1.50x | - | - | - | - | 1.60x | - | 1.07x | 2.50 | 1.60x |" in text
    assert "| SKD | - | - | - | - | - | - | - | - | - | - | - | - |" in text
