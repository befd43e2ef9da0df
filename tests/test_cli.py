"""The `adaswitch` command: distill per policy then evaluate, --config YAML through the installed console
script, generate's marked output, demo/bench delegation, and every bad input as one line + exit code 2."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.tiny_run import rows, write_inputs, write_jsonl

from adaswitch import cli

FAST = [
    "--max-steps",
    "1",
    "--per-device-train-batch-size",
    "2",
    "--max-new-tokens",
    "4",
    "--use-cpu",
    "--logging-steps",
    "1",
    "--save-steps",
    "1",
    "--set",
    "disable_tqdm=true",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("cli"))


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("adaswitch"), err
    for f in fragments:
        assert f in line, line


@pytest.mark.parametrize("policy", ["student", "teacher", "dataset", "mixed", "skd", "adaswitch", "random_switch"])
def test_distill_each_policy(files, tmp_path, capsys, policy):
    out = tmp_path / "out"
    extra = {"adaswitch": ["--window", "1", "--k", "0.001", "--max-divergence", "inf"],
             "random_switch": ["--window", "1", "--switch-positions", "0", "2", "-1", "--switch-weights", "1", "1",
                               "0"]}.get(policy, [])
    code, stdout, err = run(
        [
            "distill",
            "--teacher",
            files["teacher"],
            "--student",
            files["student"],
            "--train",
            files["train"],
            "--output-dir",
            out,
            "--policy",
            policy,
            *extra,
            *FAST,
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    assert "saved the distilled student" in stdout
    assert {"model.safetensors", "config.json", "tokenizer.json", "checkpoint-1"} <= set(os.listdir(out))
    log = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["log_history"][0]
    assert log["loss"] >= 0 and log["loss_tokens"] > 0
    if policy == "random_switch":  # every row switches at 0 or 2 (weight 0 on never)
        assert log["switch_rate"] == 1.0 and log["mean_switch_position"] in (0.0, 2.0, 1.0, 0.5, 1.5)
    if policy == "adaswitch":
        assert log["switch_rate"] > 0 and "mean_switch_position" in log
        code, stdout, err = run(
            [
                "evaluate",
                "--model",
                out,
                "--data",
                files["test"],
                "--teacher",
                files["teacher"],
                "--answer-marker",
                "answer",
                "--max-new-tokens",
                "4",
                "--output",
                tmp_path / "eval.json",
                "--no-progress",
            ],
            capsys,
        )
        assert code == 0, err[-3000:]
        summary = json.loads(stdout)
        assert summary["num_examples"] == 3 and 0 <= summary["accuracy"] <= 1 and summary["teacher_kl"] > 0
        assert len(json.loads((tmp_path / "eval.json").read_text())["examples"]) == 3


def test_console_script_with_yaml_config_and_resume(files, tmp_path):
    exe = Path(sys.executable).parent / "adaswitch"
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"teacher: {files['teacher']}\nstudent: {files['student']}\ntrain: {files['train']}\n"
        f"output_dir: {out}\npolicy: skd\nskd_top_k: 5\nmax_new_tokens: 4\nmax_steps: 2\nsave_steps: 1\n"
        "per_device_train_batch_size: 2\nuse_cpu: true\ndisable_tqdm: true\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [str(exe), "distill", "--config", str(config), "--max-steps", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    args = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert args["max_steps"] == 1  # the command line overrides the file
    again = subprocess.run(
        [str(exe), "distill", "--config", str(config), "--resume-from-checkpoint", "last"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_generate_marks_the_teacher_span(files, capsys):
    code, out, err = run(
        [
            "generate",
            "--teacher",
            files["teacher"],
            "--student",
            files["student"],
            "--prompt",
            "what is two plus two",
            "--prompt",
            "the cat sat on",
            "--window",
            "1",
            "--k",
            "0.001",
            "--max-new-tokens",
            "6",
            "--color",
            "never",
        ],
        capsys,
    )
    assert code == 0, err
    assert out.count("prompt:") == 2 and "[[" in out and "]]" in out
    assert "switch at response token" in out and "tokens from the teacher" in out


CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}answer"
    "{% endif %}"
)


@pytest.mark.parametrize("raw", [False, True])
def test_generate_prompt_goes_through_the_chat_template(files, tmp_path, capsys, monkeypatch, raw):
    from transformers import AutoTokenizer

    import adaswitch.engine.generate as engine

    dirs = {}
    for name in ("teacher", "student"):
        dirs[name] = tmp_path / name
        shutil.copytree(files[name], dirs[name])
        tok = AutoTokenizer.from_pretrained(dirs[name])
        tok.chat_template = CHAT_TEMPLATE
        tok.save_pretrained(dirs[name])
    seen = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda s, t, ids, *a, **k: seen.append(ids) or real(s, t, ids, *a, **k))
    argv = ["generate", "--teacher", dirs["teacher"], "--student", dirs["student"], "--prompt", "what is two",
            "--max-new-tokens", "2", "--policy", "student"] + (["--raw-prompt"] if raw else [])
    code, out, err = run(argv, capsys)
    assert code == 0, err
    tok = cli.load_tokenizer("--teacher", dirs["teacher"])  # the tokenizer `generate` uses
    if raw:
        want = tok("what is two")["input_ids"]
    else:
        want = tok.apply_chat_template([{"role": "user", "content": "what is two"}], add_generation_prompt=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        assert want != tok("what is two")["input_ids"]  # the template changed the ids
    assert seen[0][0].tolist() == want
    assert "prompt: what is two" in out


def test_internal_errors_are_not_input_errors(monkeypatch, capsys):
    monkeypatch.delenv("ADASWITCH_DEBUG", raising=False)

    def broken(args):
        raise KeyError("slot")

    monkeypatch.setattr(cli, "_run_bench", broken)
    code, _, err = run(["bench"], capsys)
    assert code == cli.EXIT_INTERNAL == 1 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("adaswitch bench: internal error: KeyError") and "ADASWITCH_DEBUG=1" in line
    monkeypatch.setenv("ADASWITCH_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["bench"])


def test_render_response_marks_runs():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(f"t{i}" for i in ids)

    text = cli.render_response(Tok(), [1, 2, 3, 4], [False, True, True, False], color=False)
    assert text == "t1 [[t2 t3]] t4"
    assert "\033[33mt2 t3\033[0m" in cli.render_response(
        Tok(), [1, 2, 3, 4], [False, True, True, False], True
    )


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_column", ["--train: missing column(s) ['completion']"]),
        ("empty_prompt", ["--train: row 2 has an empty prompt"]),
        ("long_prompt", ["--train: row 1 has a prompt of", "longer than the limit of 60"]),
        ("no_teacher_dir", ["--teacher: not a directory"]),
        ("not_a_model", ["is not a saved model (no config.json)"]),
        ("bad_policy", ["argument --policy: invalid choice: 'greedy'", "--help"]),
        ("bad_value", ["k must be a number > 0"]),
        ("bad_number", ["argument --window: invalid int value"]),
        ("unknown_yaml_key", ["unknown setting(s) ['learning_rat']"]),
        ("missing_train", ["missing --train"]),
        ("missing_file", ["--train: file not found"]),
        ("bad_set", ["--set: expected KEY=VALUE"]),
        ("bad_set_type", ["--set seed: expected an integer, got 'abc'"]),
        ("empty_file", ["--train:", "is empty (no rows)"]),
        ("output_is_file", ["--output-dir:", "exists and is not a directory"]),
        ("resume_missing", ["--resume-from-checkpoint: not a directory"]),
        ("resume_not_checkpoint", ["--resume-from-checkpoint:", "is not a checkpoint (no trainer_state.json)"]),
        ("resume_last_none", ["--resume-from-checkpoint last: no checkpoint-N under"]),
    ],
)
def test_distill_bad_inputs(files, tmp_path, capsys, monkeypatch, case, fragments):
    base = [
        "distill",
        "--teacher",
        files["teacher"],
        "--student",
        files["student"],
        "--output-dir",
        tmp_path / "o",
    ]
    train = ["--train", files["train"]]
    data = tmp_path / "d.jsonl"
    cases = {
        "missing_column": lambda: (
            base + ["--train", write_jsonl(data, [{"prompt": "a"}]), "--policy", "dataset"]
        ),
        "empty_prompt": lambda: (
            base + ["--train", write_jsonl(data, rows(2) + [{"prompt": " ", "completion": "b"}])]
        ),
        "long_prompt": lambda: (
            base
            + ["--train", write_jsonl(data, [rows(1)[0], {"prompt": "the cat " * 40, "completion": "b"}])]
        ),
        "no_teacher_dir": lambda: [
            "distill",
            "--teacher",
            tmp_path / "nope",
            "--student",
            files["student"],
            *train,
            "--output-dir",
            tmp_path / "o",
        ],
        "not_a_model": lambda: [
            "distill",
            "--teacher",
            tmp_path,
            "--student",
            files["student"],
            *train,
            "--output-dir",
            tmp_path / "o",
        ],
        "bad_policy": lambda: base + train + ["--policy", "greedy"],
        "bad_value": lambda: base + train + ["--k", "-1"],
        "bad_number": lambda: base + train + ["--window", "two"],
        "unknown_yaml_key": lambda: ["distill", "--config", tmp_path / "c.yaml"] + base[1:] + train,
        "missing_train": lambda: base,
        "missing_file": lambda: base + ["--train", tmp_path / "absent.jsonl"],
        "bad_set": lambda: base + train + ["--set", "seed"],
        "bad_set_type": lambda: base + train + ["--set", "seed=abc"],
        "empty_file": lambda: base + ["--train", write_jsonl(data, [])],
        "output_is_file": lambda: base[:-1] + [write_jsonl(tmp_path / "f.jsonl", [])] + train,
        "resume_missing": lambda: base + train + ["--resume-from-checkpoint", tmp_path / "nope"],
        "resume_not_checkpoint": lambda: base + train + ["--resume-from-checkpoint", files["student"]],
        "resume_last_none": lambda: base + train + ["--resume-from-checkpoint", "last"],
    }
    argv = cases[case]()
    (tmp_path / "c.yaml").write_text("learning_rat: 0.1\n")
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("a model was loaded before the error"))
    code, _, err = run(argv + FAST[:7], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "o").exists()  # nothing left on disk


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("bad_input_after_load", ["the tokenizer has 300 tokens but the student has 200 and the teacher"]),
        ("fails_in_training", ["internal error: RuntimeError: boom", "ADASWITCH_DEBUG=1"]),
    ],
)
def test_failed_distill_leaves_no_output_dir(files, tmp_path, capsys, monkeypatch, case, fragments):
    """Errors once the models are loaded (a student with fewer output rows than the tokenizer has tokens; a
    failure inside training): the output directory the run created is removed when it holds no file."""
    student = files["student"]
    if case == "fails_in_training":
        from adaswitch.train.distiller import Distiller

        def boom(self, *a, **k):
            raise RuntimeError("boom")

        monkeypatch.setattr(Distiller, "train", boom)
    else:
        from tiny_models import tiny_student, tiny_tokenizer

        student = tmp_path / "small_student"
        tiny_student(vocab_size=200, max_positions=64).save_pretrained(student)
        tiny_tokenizer().save_pretrained(student)
    out = tmp_path / "o"
    argv = ["distill", "--teacher", files["teacher"], "--student", student, "--train", files["train"],
            "--output-dir", out, *FAST[:7]]
    code, _, err = run(argv, capsys)
    if case == "fails_in_training":
        assert code == cli.EXIT_INTERNAL and "Traceback" not in err
        assert all(f in err.strip().splitlines()[-1] for f in fragments), err
    else:
        assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_set_values_follow_the_field_type():
    fields = cli._config_fields()

    def typed(key, text):
        return cli.typed_value(key, cli._load_yaml(text), fields, raw=text)

    assert typed("save_strategy", "no") == "no"  # YAML 1.1 would read False
    assert typed("eval_strategy", "no") == "no"
    assert typed("disable_tqdm", "yes") is True and typed("bf16", "off") is False
    assert typed("learning_rate", "1e-4") == 1e-4 and typed("k", "inf") == float("inf")
    assert typed("seed", "7") == 7 and typed("max_prompt_length", "null") is None
    assert typed("hub_model_id", "123") == "123" and typed("report_to", "[tensorboard]") == ["tensorboard"]
    for key, text in (("seed", "abc"), ("bf16", "maybe"), ("learning_rate", "fast")):
        with pytest.raises(cli.CliError, match=f"--set {key}: expected"):
            typed(key, text)


def test_set_save_strategy_no_trains(files, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["distill", "--teacher", files["teacher"], "--student", files["student"], "--train", files["train"],
            "--output-dir", out, *FAST[:9], "--set", "save_strategy=no", "--set", "disable_tqdm=yes"]
    code, _, err = run(argv, capsys)
    assert code == 0, err[-3000:]
    assert (out / "model.safetensors").exists() and not any(out.glob("checkpoint-*"))  # no checkpoint saved


def test_other_commands_bad_inputs(files, tmp_path, capsys, monkeypatch):
    code, _, err = run(["evaluate", "--model", files["student"], "--data", tmp_path / "x.csv"], capsys)
    assert_one_line_error(code, err, "evaluation dataset: file not found")
    with monkeypatch.context() as m:  # found before any model loads, not after the whole evaluation
        m.setattr(cli, "load_model", lambda *a: pytest.fail("a model was loaded before the error"))
        code, _, err = run(["evaluate", "--model", files["student"], "--data", files["test"], "--output", tmp_path],
                           capsys)
        assert_one_line_error(code, err, "--output:", "is a directory")
        code, _, err = run(["evaluate", "--model", files["student"], "--data", files["test"], "--output",
                            Path(files["test"]) / "x.json"], capsys)
        assert_one_line_error(code, err, "--output: cannot create", "is a file, not a directory")
    code, _, err = run(
        [
            "generate",
            "--teacher",
            files["teacher"],
            "--student",
            files["student"],
            "--prompt",
            "a",
            "--policy",
            "dataset",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "--policy dataset generates nothing")
    code, _, err = run(["frobnicate"], capsys)
    assert_one_line_error(code, err, "invalid choice: 'frobnicate'")


def test_demo_delegates_or_explains(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "adaswitch.demo.run", None)  # as if the demo were not installed
    code, _, err = run(["demo", "--quick"], capsys)
    assert_one_line_error(code, err, "the demo is not available")
    seen = []
    fake = type(sys)("adaswitch.demo.run")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "adaswitch.demo.run", fake)
    assert cli.main(["demo", "--quick", "--out", "x"]) == 0 and seen == [["--quick", "--out", "x"]]


def test_bench_runs_the_scripts(monkeypatch, tmp_path, capsys):
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "bench_ok.py").write_text("print('ratio 2.0x')\n")
    (bench / "bench_bad.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: bench)
    code, out, _ = run(["bench", "--list"], capsys)
    assert code == 0 and out.split() == ["bad", "ok"]
    code = cli.main(["bench", "ok"])
    assert code == 0
    code, _, err = run(["bench", "bad"], capsys)
    assert_one_line_error(code, err, "benchmark(s) failed: ['bad']")
    code, _, err = run(["bench", "nope"], capsys)
    assert_one_line_error(code, err, "unknown benchmark(s) ['nope']")
    shutil.rmtree(bench)
    code, _, err = run(["bench"], capsys)
    assert_one_line_error(code, err, "no benchmark scripts found")


def test_help_is_there(capsys):
    for argv in (
        [],
        ["--help"],
        ["distill", "--help"],
        ["generate", "--help"],
        ["evaluate", "--help"],
        ["bench", "--help"],
    ):
        code, out, _ = run(argv, capsys)
        assert code == (2 if argv == [] else 0) and "usage: adaswitch" in out, (argv, code)
    _, out, _ = run(["distill", "--help"], capsys)
    for flag in ("--teacher", "--policy", "--window", "--k", "--loss-kind", "--token-mask", "--config"):
        assert flag in out
