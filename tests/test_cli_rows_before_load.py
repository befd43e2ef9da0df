"""`adaswitch distill` reports a bad data row (a character the tokenizer cannot encode, an empty prompt or
completion, a prompt over the limit) as one line naming the option and the row before any model loads,
and leaves the output directory as it was. The model directories here hold a config.json and a tokenizer
but no weights: the checks need neither."""

from pathlib import Path

import pytest
from scripts.tiny_run import rows, write_jsonl
from test_cli import assert_one_line_error, run
from tiny_models import _vocabulary, tiny_student, tiny_teacher, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from adaswitch import cli

ARGS = ["--max-new-tokens", "4", "--use-cpu", "--max-steps", "1"]  # context 64: prompts up to 60 tokens


def no_unknown_token_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny vocabulary without an unknown token (its id renamed): a word outside it cannot be encoded."""
    vocab = {("<unused>" if t == "<unk>" else t): i for t, i in _vocabulary().items()}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rows")
    out = {}
    for name, model, tok in (
        ("teacher", tiny_teacher(max_positions=64), tiny_tokenizer()),
        ("student", tiny_student(max_positions=64), tiny_tokenizer()),
        ("bare_teacher", tiny_teacher(max_positions=64), None),  # the student's tokenizer serves both
        ("strict_student", tiny_student(max_positions=64), no_unknown_token_tokenizer()),
    ):
        model.config.save_pretrained(root / name)  # config.json only: no weights to load
        if tok is not None:
            tok.save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.fixture
def loads(monkeypatch):
    """Every model load the command attempts (recorded, then refused)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("a model was loaded")

    monkeypatch.setattr(cli, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    return calls


GOOD = rows(3)
CASES = {
    "unencodable": (
        "strict_student",
        {"--train": GOOD[:1] + [{"prompt": "the cat zebra", "completion": "a"}] + GOOD[1:]},
        ["--train: row 1: the tokenizer cannot encode the prompt", "Missing [UNK] token"],
    ),
    "empty_prompt": ("student", {"--train": GOOD + [{"prompt": "  ", "completion": "a"}]},
                     ["--train: row 3 has an empty prompt"]),
    "long_prompt": ("student", {"--train": GOOD[:2] + [{"prompt": "the cat " * 40, "completion": "a"}]},
                    ["--train: row 2 has a prompt of 80 tokens, longer than the limit of 60"]),
    "empty_completion": ("student", {"--train": GOOD[:1] + [{"prompt": "the cat", "completion": ""}]},
                         ["--train: row 1 has an empty completion"]),
    "eval_row": ("student", {"--train": GOOD, "--eval": GOOD[:1] + [{"prompt": "", "completion": "a"}]},
                 ["--eval: row 1 has an empty prompt"]),
}


@pytest.mark.parametrize("before", ["absent", "empty", "with_a_file"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_row_is_reported_before_any_model_loads(dirs, loads, tmp_path, capsys, case, before):
    student, files, fragments = CASES[case]
    out = tmp_path / "out"
    if before != "absent":
        out.mkdir()
    if before == "with_a_file":
        (out / "notes.txt").write_text("kept")
    teacher = dirs["bare_teacher" if student == "strict_student" else "teacher"]
    argv = ["distill", "--teacher", teacher, "--student", dirs[student], "--output-dir", out, *ARGS]
    for option, data in files.items():
        argv += [option, write_jsonl(tmp_path / f"{option[2:]}.jsonl", data)]
    if case == "empty_completion":
        argv += ["--policy", "dataset"]
    if before == "with_a_file":  # a non-empty --output-dir is refused first, unless the user says to write there
        argv += ["--overwrite-output-dir"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert loads == []
    state = {"absent": None, "empty": [], "with_a_file": ["notes.txt"]}[before]
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == state
    if before == "with_a_file":
        assert (out / "notes.txt").read_text() == "kept"


def test_good_rows_reach_the_model_load(dirs, loads, tmp_path, capsys):
    """The control: with good rows the same command gets as far as loading the student."""
    out = tmp_path / "out"
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    argv = ["distill", "--teacher", dirs["bare_teacher"], "--student", dirs["strict_student"], "--train", train,
            "--output-dir", out, *ARGS]
    code, _, err = run(argv, capsys)
    assert code == cli.EXIT_INTERNAL and "a model was loaded" in err, err
    assert [Path(str(c[-1])).name for c in loads] == ["strict_student"]
    assert not out.exists()
