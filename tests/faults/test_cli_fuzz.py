"""A property-based fuzz of `adaswitch distill`'s options (hypothesis): whatever values are given (NaN, inf,
0, negative, huge, not a number, options of another policy), the command ends with exit 0 and a saved model,
or exit 2 and one error line (nothing left in --output-dir); never exit 1 (an internal error), and never a
change to its input directories. Accepted options really train (one step on the tiny models), so an option
that passes the checks and then breaks the run fails here. Derandomized: CI runs the same examples."""

import itertools

import pytest
from faultlib import distill_argv, run_cli, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaswitch.train.config import POLICY_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")

WEIRD_NUMBERS = ["nan", "inf", "-inf", "0", "-1", "1e309", "1e-30", "abc", "", "0.5", "1", "2", "1e30"]
WEIRD_INTS = ["0", "-1", "1", "2", "3", "4", "1000", "2.5", "abc", "99999999999999999999"]


def numbers():
    finite = st.floats(min_value=-10, max_value=10, allow_nan=False).map(repr)
    return st.one_of(st.sampled_from(WEIRD_NUMBERS), finite)


def ints():
    return st.one_of(st.sampled_from(WEIRD_INTS), st.integers(-3, 12).map(str))


OPTIONS = {
    "--policy": st.sampled_from([*POLICY_NAMES, "greedy"]),
    "--learning-rate": numbers(),
    "--max-new-tokens": ints(),
    "--lookahead": ints(),
    "--per-device-train-batch-size": ints(),
    "--gradient-accumulation-steps": ints(),
    "--window": ints(),
    "--k": numbers(),
    "--lmbda": numbers(),
    "--skd-top-k": ints(),
    "--student-temperature": numbers(),
    "--teacher-top-p": numbers(),
    "--min-divergence": numbers(),
    "--max-divergence": numbers(),
    "--beta": numbers(),
    "--loss-temperature": numbers(),
    "--loss-kind": st.sampled_from(["forward_kl", "jsd", "tvd", "mse"]),
    "--token-mask": st.sampled_from(["all", "student", "teacher"]),
    "--seed": ints(),
    "--logging-steps": numbers(),
    "--save-total-limit": ints(),
    "--set max_grad_norm": numbers(),
    "--set warmup_steps": ints(),
}


def as_argv(chosen: dict) -> list[str]:
    argv = []
    for option, value in chosen.items():
        if option.startswith("--set "):
            argv += ["--set", f"{option[6:]}={value}"]
        else:
            argv.append(f"{option}={value}")  # `=`: a value such as -1 is not read as an option
    return argv


@pytest.fixture(scope="module")
def inputs(files):
    return {key: snapshot(files[key]) for key in ("teacher", "student", "train")}


@settings(max_examples=24, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})))
def test_distill_options_give_a_model_or_one_line(files, inputs, tmp_path, capsys, chosen):
    out = tmp_path / f"out{next(COUNTER)}"
    code, stdout, err = run_cli(distill_argv(files, out, *as_argv(chosen)), capsys)
    assert code in (0, 2), f"exit {code} for {chosen}: {err[-2000:]}"
    assert "Traceback" not in err and "internal error" not in err, err[-2000:]
    if code == 0:
        assert "saved the distilled student" in stdout and (out / "model.safetensors").is_file()
    else:
        assert err.strip().splitlines()[-1].startswith("adaswitch distill: error: "), err[-2000:]
        assert not out.exists(), sorted(p.name for p in out.iterdir())
    for key, before in inputs.items():
        assert snapshot(files[key]) == before, f"{key} changed with {chosen}"


COUNTER = itertools.count()
