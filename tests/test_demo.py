"""The embedded demo: task generator, tokenizer, teacher build script (tiny preset), the shipped
teacher checkpoint, and the demo runner and ablation end to end (tiny presets, seconds)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from adaswitch.demo.build_teacher import TEACHER_DIR
from adaswitch.demo.numerics import _has_avx2
from adaswitch.demo.task import TaskConfig, build_dataset, extract_answer, is_correct, make_example, solve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ task


def test_task_is_deterministic_per_seed():
    a = build_dataset(200, 20, seed=7)
    b = build_dataset(200, 20, seed=7)
    c = build_dataset(200, 20, seed=8)
    assert a["train"].to_list() == b["train"].to_list()
    assert a["eval"].to_list() == b["eval"].to_list()
    assert a["train"]["prompt"] != c["train"]["prompt"]
    assert set(a["eval"]["prompt"]).isdisjoint(a["train"]["prompt"])


def test_eval_split_does_not_depend_on_train_size():
    assert build_dataset(50, 30, seed=0)["eval"].to_list() == build_dataset(400, 30, seed=0)["eval"].to_list()


def test_worked_chain_is_correct_arithmetic():
    import random

    config = TaskConfig(min_operands=2, max_operands=6)
    rng = random.Random(1)
    for _ in range(300):
        row = make_example(rng, config)
        expression = row["prompt"].rstrip("=")
        assert int(row["answer"]) == eval(expression)  # Python has the same precedence: * before + and -
        steps = row["completion"].split("####")[0].split(";")
        assert len(steps) == row["num_steps"] == sum(expression.count(op) for op in "+-*")
        for step in steps:  # every step is a true equation whose values stay in range
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs) and 0 <= int(rhs) <= config.max_value
        assert extract_answer(row["completion"]) == row["answer"]


def test_solve_order_products_first():
    steps, results = solve([12, 7, 3, 5], ["+", "*", "-"])
    assert steps == ["7*3=21", "12+21=33", "33-5=28"] and results[-1] == 28


def test_answer_extraction():
    assert is_correct("1+2=3####3", "3")
    assert not is_correct("1+2=3####4", "3")
    assert not is_correct("1+2=3", "3")
    assert extract_answer("a####1####12 ") == "12"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_operands=1), "min_operands"),
        (dict(min_operands=4, max_operands=3), "max_operands"),
        (dict(max_operand=0), "max_operand"),
        (dict(max_value=3), "max_value"),
        (dict(ops="+/"), "ops"),
    ],
)
def test_task_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TaskConfig(**kwargs)


def test_build_dataset_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_train"):
        build_dataset(0, 10)
    with pytest.raises(TypeError, match="seed"):
        build_dataset(10, 10, seed="1")


# ------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_round_trip_and_special_ids(tmp_path):
    from transformers import AutoTokenizer

    from adaswitch.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "12+7*3-5=7*3=21;12+21=33;33-5=28####28"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character, nothing added
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids and again.eos_token_id == 2
    with pytest.raises(ValueError, match="chars"):
        build_tokenizer("aa")


# ------------------------------------------------------------------------------------------ teacher


def test_build_teacher_tiny_preset(tmp_path):
    from adaswitch.demo.build_teacher import load_teacher, main

    assert main(["--preset", "tiny", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    info = json.loads((tmp_path / "build_info.json").read_text())
    assert info["model"] == "teacher" and info["preset"] == "tiny" and info["architecture"] == "Qwen2ForCausalLM"
    assert 0.0 <= info["eval_accuracy"] <= 1.0 and info["train_seconds"] > 0
    model, tok = load_teacher(tmp_path)
    assert model.config.vocab_size == len(tok) and info["parameters"] == sum(p.numel() for p in model.parameters())


def test_build_teacher_rejects_bad_preset(tmp_path):
    from adaswitch.demo.build_teacher import build_teacher, load_teacher

    with pytest.raises(ValueError, match="preset"):
        build_teacher("huge", tmp_path)
    with pytest.raises(ValueError, match="output_dir"):
        build_teacher("tiny", None)
    with pytest.raises(ValueError, match="model"):
        build_teacher("tiny", tmp_path, model="critic")
    with pytest.raises(ValueError, match="no checkpoint"):
        load_teacher(tmp_path)


def test_shipped_teacher_meets_the_bar():
    from adaswitch.demo.build_teacher import MAX_CHECKPOINT_BYTES, TEACHER_DIR, DataSpec, load_teacher
    from adaswitch.demo.sft import greedy_accuracy

    assert (TEACHER_DIR / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES
    info = json.loads((TEACHER_DIR / "build_info.json").read_text())
    assert info["eval_accuracy"] >= 0.9
    model, tok = load_teacher()
    sample = DataSpec(num_train=1).build()["eval"].select(range(0, 500, 4))  # 125 problems, one batch
    assert greedy_accuracy(model, tok, sample, batch_size=128) >= 0.9


def test_shipped_student_starts_clearly_below_the_teacher():
    from adaswitch.demo.build_teacher import STUDENT_DIR, TEACHER_DIR, load_teacher

    teacher = json.loads((TEACHER_DIR / "build_info.json").read_text())
    student = json.loads((STUDENT_DIR / "build_info.json").read_text())
    assert student["model"] == "student" and student["architecture"] == "LlamaForCausalLM"
    assert student["parameters"] * 5 < teacher["parameters"]
    assert student["eval_accuracy"] <= teacher["eval_accuracy"] - 0.1
    model, tok = load_teacher(STUDENT_DIR)
    _, teacher_tok = load_teacher(TEACHER_DIR)
    assert tok.get_vocab() == teacher_tok.get_vocab()


def test_quick_preset_starts_from_the_shipped_checkpoint():
    """Every machine starts the quick demo from the same weights: no SFT at start, the shipped checkpoint
    (built by `build_teacher --model student --preset quick` on the quick preset's data)."""
    from adaswitch.demo.build_teacher import (
        MAX_CHECKPOINT_BYTES,
        QUICK_STUDENT_DIR,
        STUDENT_PRESETS,
        TEACHER_DIR,
        load_teacher,
    )
    from adaswitch.demo.presets import PRESETS

    quick = PRESETS["quick"]
    assert quick.student == QUICK_STUDENT_DIR and quick.sft_steps == 0
    assert (QUICK_STUDENT_DIR / "model.safetensors").stat().st_size <= MAX_CHECKPOINT_BYTES
    info = json.loads((QUICK_STUDENT_DIR / "build_info.json").read_text())
    spec = STUDENT_PRESETS["quick"]
    assert info["preset"] == "quick" and info["train_steps"] == spec.steps
    assert info["data"]["num_eval"] == quick.num_eval_problems >= 1000  # the eval split is held out of the SFT
    assert info["data"]["num_train"] == quick.num_train
    _, tok = load_teacher(QUICK_STUDENT_DIR)
    _, teacher_tok = load_teacher(TEACHER_DIR)
    assert tok.get_vocab() == teacher_tok.get_vocab()


# ------------------------------------------------------------------------------------------ runner


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """`adaswitch demo --tiny --workers 1` once for the tests below: (output dir, printed text)."""
    import contextlib
    import io

    from adaswitch.demo.run import main

    out = tmp_path_factory.mktemp("tiny_demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--tiny", "--output-dir", str(out), "--no-progress", "--workers", "1"]) == 0
    return out, printed.getvalue()


TIMING_KEYS = {"seconds_per_step", "overhead_vs_on_policy", "total_seconds", "date", "load_average_1m_at_end",
               "sft_seconds_at_start", "workers", "train_wall_seconds", "eval_seconds", "time_split"}


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def test_demo_results_do_not_depend_on_workers(tiny_demo, tmp_path):
    """Two worker processes (spawn, one torch thread each, a Random switch run waiting for its seed's
    AdaSwitch run) give the same results.json as every run in this process, timings aside."""
    from adaswitch.demo.run import main

    assert main(["--tiny", "--output-dir", str(tmp_path), "--no-progress", "--workers", "2"]) == 0
    one = json.loads((tiny_demo[0] / "results.json").read_text())
    two = json.loads((tmp_path / "results.json").read_text())
    assert (one["meta"]["workers"], two["meta"]["workers"]) == (1, 2)
    assert one["meta"]["threads_per_worker"] == two["meta"]["threads_per_worker"] == 1
    assert _without_timing(one) == _without_timing(two)


def test_worker_errors_name_the_run():
    from adaswitch.demo.pool import Job, RunPool
    from adaswitch.demo.presets import PRESETS

    broken = Job(name="Broken, seed 3", method="Broken", seed=3, overrides={"policy": "no_such_policy"})
    with pytest.raises(RuntimeError, match="Broken, seed 3") as caught:
        with RunPool(PRESETS["tiny"], workers=2, teacher_dir=TEACHER_DIR) as pool:
            pool.run(None, [broken], progress=False, desc="test")
    assert "policy" in str(caught.value)


def test_jobs_must_draw_from_a_job_that_draws_from_none():
    from adaswitch.demo.pool import Job, RunPool
    from adaswitch.demo.presets import PRESETS

    jobs = [Job("a", "AdaSwitch", 0, {}, after=1), Job("b", "Random switch", 0, {}, after=0)]
    with pytest.raises(ValueError, match="after"):
        RunPool(PRESETS["tiny"], workers=1, teacher_dir=TEACHER_DIR).run(None, jobs, progress=False, desc="x")


def test_default_workers_follow_the_cores(monkeypatch):
    import os

    from adaswitch.demo import presets

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7}, raising=False)
    assert presets.default_workers() == presets.MAX_DEFAULT_WORKERS == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert presets.default_workers() == 1
    with pytest.raises(ValueError, match="workers"):
        presets.check_workers(0)


def test_demo_jobs_schedule_random_switch_after_its_adaswitch():
    from adaswitch.demo.experiment import METHOD_NAMES
    from adaswitch.demo.run import demo_jobs

    jobs = demo_jobs(METHOD_NAMES, (0, 1), window=8, k=1.5)
    assert len(jobs) == 2 * len(METHOD_NAMES)
    for job in jobs:
        if job.method == "Random switch":
            source = jobs[job.after]
            assert (source.method, source.seed) == ("AdaSwitch", job.seed)
        else:
            assert job.after is None
    assert [(j.method, j.seed) for j in jobs if j.keep_model] == [("AdaSwitch", 0)]


def test_demo_tiny_end_to_end(tiny_demo):
    from matplotlib.image import imread

    from adaswitch.demo.experiment import METHOD_NAMES
    from adaswitch.demo.run import PAIRED_COLUMNS, TABLE_COLUMNS

    tmp_path, printed = tiny_demo
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(lines) == 2 * (2 + len(METHOD_NAMES))
    table, paired_table = lines[: 2 + len(METHOD_NAMES)], lines[2 + len(METHOD_NAMES):]
    assert all(line.count("|") == len(TABLE_COLUMNS) + 1 for line in table)
    assert all(line.count("|") == len(PAIRED_COLUMNS) + 1 for line in paired_table)
    assert [line.split("|")[1].strip() for line in table[2:]] == list(METHOD_NAMES)
    assert {"Fixed switch", "Random switch"} <= set(METHOD_NAMES)

    results = json.loads((tmp_path / "results.json").read_text())
    entries = results["results"]
    assert [e["method"] for e in entries] == list(METHOD_NAMES)
    assert all(0.0 <= e["accuracy"] <= 1.0 and len(e["accuracies"]) == 2 for e in entries)
    on_policy = next(e for e in entries if e["method"] == "On-policy (GKD)")
    assert on_policy["overhead_vs_on_policy"] == 1.0
    assert all(0.0 <= e["step_accuracy"] <= 1.0 for e in entries)
    adaswitch = next(e for e in entries if e["method"] == "AdaSwitch")
    assert 0.0 <= adaswitch["switch_rate"] <= 1.0
    assert set(adaswitch["paired"]) == {"On-policy (GKD)", "SKD"}
    assert adaswitch["paired"]["SKD"]["step_accuracy"]["n"] == 2
    fixed = next(e for e in entries if e["method"] == "Fixed switch")
    assert fixed["switch_rate"] > 0 and fixed["mean_switch_position"] == 8.0  # the warm-up, L = 8
    runs = {(r["method"], r["seed"]): r for r in results["runs"]}
    for seed in (0, 1):  # AdaSwitch's observed switch positions (index p + 1; 0 = never) for the random control
        counts = runs[("AdaSwitch", seed)]["switch_position_counts"]
        assert sum(counts) == 4  # 1 step x 4 rows
        # each run records the decoding settings its config resolved (the defaults)
        # (the demo fixes them so that its digits repeat: lookahead="auto" picks G from timings)
        assert runs[("SKD", seed)]["decoding"] == {"lookahead": 4, "guidance": "step", "mean_lookahead": 4.0}
        ada = runs[("AdaSwitch", seed)]["decoding"]
        assert (ada["lookahead"], ada["guidance"], ada["mean_lookahead"]) == (0, "step", 0.0)
        assert runs[("SFT only", seed)]["decoding"] is None
    assert len(results["runs"]) == 2 * len(METHOD_NAMES)
    assert results["meta"]["preset"] == "tiny" and results["meta"]["teacher_accuracy"] >= 0.9
    for name in ("accuracy.png", "switch_positions.png", "divergence_trace.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_demo_rejects_bad_arguments_before_work(tmp_path):
    from adaswitch.demo.experiment import Budget
    from adaswitch.demo.run import run_demo

    with pytest.raises(ValueError, match="preset"):
        run_demo("huge", tmp_path)
    with pytest.raises(ValueError, match="window"):
        run_demo("tiny", tmp_path, window=0)
    with pytest.raises(ValueError, match="methods"):
        run_demo("tiny", tmp_path, methods=("GKD",))
    with pytest.raises(ValueError, match="Random switch"):
        run_demo("tiny", tmp_path, methods=("SKD", "Random switch"))
    with pytest.raises(ValueError, match="workers"):
        run_demo("tiny", tmp_path, workers=0)
    with pytest.raises(ValueError, match="steps"):
        Budget(steps=0, batch_size=4)
    assert not (tmp_path / "results.json").exists()


def test_paired_statistics():
    from adaswitch.demo.stats import binomial_std, format_paired, paired

    p = paired({0: 0.6, 1: 0.7, 2: 0.65}, {0: 0.5, 1: 0.6, 2: 0.56})
    assert p["n"] == 3 and p["wins"] == 3 and p["mean"] == pytest.approx(0.0967, abs=1e-4) and p["significant"]
    noisy = paired({0: 0.6, 1: 0.5, 2: 0.65}, {0: 0.5, 1: 0.6, 2: 0.56})
    assert noisy["wins"] == 2 and not noisy["significant"]
    assert not paired({0: 0.9}, {0: 0.1})["significant"]  # one seed: never
    assert paired({0: 0.5, 1: 0.6}, {1: 0.5, 2: 0.1})["n"] == 1  # only the shared seeds are paired
    assert format_paired(p) == "+9.7 ± 0.6 (3/3)*" and format_paired(paired({}, {})) == "-"
    assert binomial_std(0.5, 100) == pytest.approx(0.05)


def test_random_switch_overrides_from_counts():
    from adaswitch.demo.experiment import method_overrides

    got = method_overrides("Random switch", window=8, k=1.5, skd_top_k=2, switch_counts=[3, 0, 0, 5, 0, 1])
    assert got["policy"] == "random_switch" and got["switch_positions"] == [-1, 2, 4]
    assert got["switch_weights"] == [3.0, 5.0, 1.0]
    with pytest.raises(ValueError, match="AdaSwitch"):
        method_overrides("Random switch", window=8, k=1.5, skd_top_k=2)
    assert method_overrides("Fixed switch", window=8, k=1.5, skd_top_k=2)["policy"] == "fixed_switch"


def test_summary_means_std_and_overhead():
    from adaswitch.demo.run import format_table, summarise

    nan = math.nan

    def run(method, seed, acc, sec):
        return {
            "method": method,
            "seed": seed,
            "accuracy": acc,
            "teacher_kl": 0.1,
            "switch_rate": nan,
            "mean_switch_position": nan,
            "teacher_token_fraction": nan,
            "response_tokens_per_step": 10.0,
            "seconds_per_step": sec,
        }

    runs = [
        run("On-policy (GKD)", 0, 0.5, 1.0),
        run("On-policy (GKD)", 1, 0.7, 3.0),
        run("AdaSwitch", 0, 0.6, 3.0),
        run("AdaSwitch", 1, 0.6, 3.0),
    ]
    rows = summarise(runs)
    assert [r["method"] for r in rows] == ["On-policy (GKD)", "AdaSwitch"]
    assert rows[0]["accuracy"] == pytest.approx(0.6) and rows[0]["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[1]["overhead_vs_on_policy"] == pytest.approx(1.5)
    assert "| AdaSwitch | 60.0 ± 0.0 |" in format_table(rows)


def test_moving_threshold_matches_the_policy_rule():
    from adaswitch.demo.plots import moving_threshold

    d = [1.0, 2.0, 3.0, 4.0, 5.0]
    tau = moving_threshold(d, window=2, k=3.0)
    assert math.isnan(tau[0]) and math.isnan(tau[1])
    assert tau[2:] == [3.0 * 1.5, 3.0 * 2.5, 3.0 * 3.5]  # K x mean of the 2 values before i
    assert math.isnan(moving_threshold(d, window=2, k=3.0, warmup=4)[3])


def test_ablation_tiny(tmp_path):
    from adaswitch.demo.ablation import main

    argv = [
        "--tiny",
        "--output-dir",
        str(tmp_path),
        "--windows",
        "4",
        "--ks",
        "1.5",
        "3",
        "--seeds",
        "0",
        "--no-progress",
        "--workers",
        "2",
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["meta"]["workers"] == 2 and result["meta"]["seeds"] == [0]
    assert [(c["window"], c["k"]) for c in result["cells"]] == [(4, 1.5), (4, 3.0)]
    best = max(result["cells"], key=lambda c: (c["accuracy"], -c["teacher_kl"]))
    assert (result["best"]["window"], result["best"]["k"]) == (best["window"], best["k"])


def test_switch_ablation_tiny_and_render(tmp_path):
    """The switching-rule sweep: the default first, one row per setting and control, paired differences
    against the default; --render regenerates the same table and the plot from the JSON alone."""
    from adaswitch.demo.ablation import BASELINE, format_switch_table, main, render_switch

    argv = ["--switch", "--tiny", "--output-dir", str(tmp_path), "--divergences", "forward_kl", "tvd",
            "--min-divergences", "0.5", "--max-divergences", "0", "--seeds", "0", "1", "--no-progress",
            "--workers", "1"]
    assert main(argv) == 0
    result = json.loads((tmp_path / "ablation_switch.json").read_text())
    names = [c["name"] for c in result["cells"]]
    assert names == [BASELINE, "D = tvd", "F = 0.5", "A = 0", "fixed switch", "random switch"]
    assert result["meta"]["seeds"] == [0, 1] and len(result["runs"]) == 12
    cells = {c["name"]: c for c in result["cells"]}
    assert cells["A = 0"]["switch_rate"] == 1.0 and cells["A = 0"]["mean_switch_position"] == 0.0
    assert cells["fixed switch"]["mean_switch_position"] == 8.0
    assert cells["D = tvd"]["vs_default"]["step_accuracy"]["n"] == 2
    assert (tmp_path / "ablation_switch.png").read_bytes()[:8] == PNG_MAGIC
    (tmp_path / "ablation_switch.png").unlink()
    rendered = render_switch(tmp_path / "ablation_switch.json")
    assert (tmp_path / "ablation_switch.png").exists()
    assert rendered["table"].splitlines()[2].startswith(f"| {BASELINE} |")
    assert rendered["table"] == format_switch_table(rendered["cells"])


def test_committed_switch_ablation_table_is_generated_from_its_json():
    """docs/ablation.md shows the table `--switch --render` generates from the committed JSON (3 seeds, every
    setting of the sweep, the two controls)."""
    from adaswitch.demo.ablation import BASELINE, CONTROLS, format_switch_table, switch_configs

    root = Path(__file__).parents[1]
    result = json.loads((root / "docs" / "demo_results" / "ablation_switch.json").read_text())
    assert result["meta"]["seeds"] == [0, 1, 2] and result["meta"]["preset"] == "quick"
    assert [c["name"] for c in result["cells"]] == [c["name"] for c in switch_configs()]
    assert result["cells"][0]["name"] == BASELINE and [c["name"] for c in result["cells"][-2:]] == list(CONTROLS)
    assert format_switch_table(result["cells"]) in (root / "docs" / "ablation.md").read_text()
    assert (root / "docs" / "demo_results" / "ablation_switch.png").read_bytes()[:8] == PNG_MAGIC


def test_demo_records_versions_cpu_code_path_and_time_split(tiny_demo):
    """Every results file names the packages and CPU code path it ran with, and where its time went."""
    import json

    from adaswitch.versions import package_versions

    out, _ = tiny_demo
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["versions"] == package_versions() and meta["versions"]["transformers"]
    assert meta["cpu_numerics"]["aten_capability_in_use"]
    split = meta["time_split"]
    assert split["runs_train_seconds"] > 0 and split["runs_eval_seconds"] > 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(r["train_wall_seconds"] > 0 and r["eval_seconds"] > 0 for r in runs)


def test_demo_pins_cpu_code_paths_only_where_unset(monkeypatch):
    import os

    from adaswitch.demo import numerics

    for name in numerics.AVX2_PATHS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # the user's own choice stays
    monkeypatch.setattr(numerics, "_has_avx2", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # as in a fresh process
    with numerics.pinned_cpu_numerics():
        assert os.environ["MKL_CBWR"] == "COMPATIBLE"
        assert os.environ["ATEN_CPU_CAPABILITY"] == "avx2" and os.environ["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert "ATEN_CPU_CAPABILITY" not in os.environ and os.environ["MKL_CBWR"] == "COMPATIBLE"  # restored
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setenv("ADASWITCH_DEMO_PIN_CPU", "0")
    with numerics.pinned_cpu_numerics():
        assert not any(name in os.environ for name in numerics.AVX2_PATHS)
    monkeypatch.delenv("ADASWITCH_DEMO_PIN_CPU")
    monkeypatch.setattr(numerics, "_has_avx2", lambda: False)  # no AVX2: nothing to pin to
    with numerics.pinned_cpu_numerics():
        assert not any(name in os.environ for name in numerics.AVX2_PATHS)
    # torch already on a wider path (it ran CPU kernels before): the workers are not pinned either
    monkeypatch.setattr(numerics, "_has_avx2", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with numerics.pinned_cpu_numerics():
        assert not any(name in os.environ for name in numerics.AVX2_PATHS)


@pytest.mark.skipif(not _has_avx2(), reason="no AVX2")
def test_the_pin_takes_in_a_fresh_process_and_is_dropped_after_cpu_work():
    """In a fresh process torch runs the pinned AVX2 path (on an AVX-512 host too); in one whose torch ran CPU
    kernels first, the switches are not set, so its runs and its workers' compute alike."""
    import subprocess
    import sys

    code = ("import os, torch\n{before}\nfrom adaswitch.demo.numerics import pinned_cpu_numerics\n"
            "with pinned_cpu_numerics():\n"
            "    print(torch.backends.cpu.get_cpu_capability(), os.environ.get('ATEN_CPU_CAPABILITY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ADASWITCH_DEMO_PIN_CPU")}
    fresh = subprocess.run([sys.executable, "-c", code.format(before="")], capture_output=True, text=True, env=env)
    assert fresh.stdout.split() == ["AVX2", "avx2"], fresh.stderr
    busy = subprocess.run([sys.executable, "-c", code.format(before="torch.ones(4) + 1")], capture_output=True,
                          text=True, env=env)
    capability, pinned = busy.stdout.split()
    assert pinned == ("avx2" if capability == "AVX2" else "None"), busy.stdout
