"""Every option checked once, before any work (spec 5.1): one line naming the option as the user wrote it
(`--gradient-accumulation-steps`, `--set max_grad_norm`, `seed (in run.yaml)`) and what was expected, before
any model loads; options of a policy that does not take them are refused, not ignored; the lookahead is
clamped to the budget by default and refused beyond it when given."""

import pytest
from faultlib import distill_argv, one_line_error, run_cli

from adaswitch import DistillConfig, cli


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("a model was loaded before the error"))


CASES = {
    "grad_accumulation_0": (["--gradient-accumulation-steps", "0"],
                            ["--gradient-accumulation-steps must be an int >= 1"]),
    "batch_0": (["--per-device-train-batch-size", "0"], ["--per-device-train-batch-size must be an int >= 1"]),
    "eval_batch_0": (["--per-device-eval-batch-size", "0"], ["--per-device-eval-batch-size must be an int >= 1"]),
    "lr_nan": (["--learning-rate", "nan"], ["--learning-rate must be a finite number >= 0, got nan"]),
    "lr_inf": (["--learning-rate", "inf"], ["--learning-rate must be a finite number >= 0, got inf"]),
    "lr_negative": (["--learning-rate=-1e-3"], ["--learning-rate must be a finite number >= 0"]),
    "max_grad_norm_nan": (["--set", "max_grad_norm=nan"], ["--set max_grad_norm must be a finite number >= 0"]),
    "max_steps_0": (["--max-steps", "0"], ["--max-steps must be an int >= 1, or -1"]),
    "epochs_0": (["--max-steps", "-1", "--num-train-epochs", "0"], ["--num-train-epochs must be a finite number > 0"]),
    "logging_nan": (["--logging-steps", "nan"], ["--logging-steps must be a finite number > 0"]),
    "save_total_limit_0": (["--save-total-limit", "0"], ["--save-total-limit must be an int >= 1 or None"]),
    "seed_negative": (["--seed", "-1"], ["--seed must be an int in [0, 4294967295]"]),
    "lookahead_past_budget": (["--lookahead", "1000"], ["--lookahead must be <= max_new_tokens (4)", "got 1000"]),
    "k_with_dataset": (["--policy", "dataset", "--k", "3"], ["--k applies to policies 'adaswitch'", "not 'dataset'"]),
    "lmbda_with_student": (["--policy", "student", "--lmbda", "0.2"], ["--lmbda applies to policy 'mixed'"]),
    "teacher_sampling_with_student": (["--policy", "student", "--teacher-temperature", "0"],
                                      ["--teacher-temperature applies to policies 'teacher'"]),
    "lookahead_with_student": (["--policy", "student", "--lookahead", "2"], ["lookahead applies to policies"]),
    "policy_value_named": (["--window", "0"], ["--window must be an int >= 1"]),
    "policy_argument_renamed": (["--switch-temperature", "0"], ["--switch-temperature must be a finite number > 0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_option_is_one_line_before_any_model_loads(files, tmp_path, capsys, no_model_load, case):
    extra, fragments = CASES[case]
    code, _, err = run_cli(distill_argv(files, tmp_path / "out", *extra), capsys)
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_yaml_setting_is_named_as_written(files, tmp_path, capsys, no_model_load):
    config = tmp_path / "run.yaml"
    config.write_text("gradient_accumulation_steps: 0\n")
    code, _, err = run_cli(["distill", "--config", config, *distill_argv(files, tmp_path / "out")[1:]], capsys)
    one_line_error(code, err, f"gradient_accumulation_steps (in {config}) must be an int >= 1")


def test_generate_checks_its_options_too(files, capsys, no_model_load):
    argv = ["generate", "--teacher", files["teacher"], "--student", files["student"], "--prompt", "a",
            "--max-new-tokens", "3", "--lookahead", "8"]
    code, _, err = run_cli(argv, capsys)
    one_line_error(code, err, "--lookahead must be <= max_new_tokens (3)")


def make(**kw):
    return DistillConfig(output_dir="unused", report_to=[], use_cpu=True, **kw)


def test_lookahead_is_auto_or_within_the_budget():
    """"auto" picks G within the tokens left (so any budget takes it); a fixed G past the budget is refused."""
    assert make(policy="skd", max_new_tokens=2).lookahead == "auto"
    with pytest.raises(ValueError, match="lookahead must be <= max_new_tokens"):
        make(policy="skd", max_new_tokens=2, lookahead=3)


def test_parameters_of_the_policy_and_the_loss_are_accepted():
    """The controls take AdaSwitch's parameters (the demo sets k for them); beta and alpha also shape the loss."""
    assert make(policy="fixed_switch", window=4, k=2.0).build_policy().window == 4
    assert make(policy="dataset", beta=0.3, loss_kind="jsd").beta == 0.3
    assert make(policy="student", k=1.5).policy == "student"  # a default value changes nothing: not refused


def test_generate_refuses_a_lookahead_past_the_budget(student, teacher):
    """Accepted before, and each step then cost G forwards for at most max_new_tokens tokens."""
    from tiny_models import EOS_ID, PAD_ID, random_prompts

    from adaswitch import AdaSwitch, generate

    ids, mask = random_prompts(2, 4, min_len=2)
    with pytest.raises(ValueError, match=r"lookahead must be <= max_new_tokens \(3\)"):
        generate(student, teacher, ids, mask, policy=AdaSwitch(), max_new_tokens=3, lookahead=8,
                 eos_token_id=EOS_ID, pad_token_id=PAD_ID)
