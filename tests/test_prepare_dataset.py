"""`prepare_dataset`: raw rows are read and tokenized; rows it already tokenized (what `adaswitch distill`
hands the Distiller after checking them before any model loads) are checked against the run's limits
instead, with errors naming the original row."""

import datasets
import pytest
from scripts.tiny_run import rows
from tiny_models import VOCAB_SIZE, tiny_distiller, tiny_tokenizer

from adaswitch.train.data import (
    COMPLETION_IDS,
    EXAMPLE_KEY,
    PROMPT_IDS,
    is_tokenized,
    prepare_dataset,
    tokenize_dataset,
)


def prepared(n=4, **kw):
    settings = dict(max_prompt_length=60, max_completion_length=8, name="train dataset")
    return prepare_dataset(datasets.Dataset.from_list(rows(n)), tiny_tokenizer(), **{**settings, **kw})


def test_raw_rows_are_tokenized_and_tokenized_rows_pass_through():
    raw = datasets.Dataset.from_list(rows(4))
    tokens = prepared()
    assert is_tokenized(tokens) and not is_tokenized(raw)
    expected = tokenize_dataset(raw, tiny_tokenizer(), max_prompt_length=60, max_completion_length=8)
    assert tokens.to_list() == expected.to_list()
    again = prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=60, max_completion_length=8)
    assert again.to_list() == tokens.to_list()


def test_tokenized_rows_meet_this_runs_limits():
    tokens = prepared().select([3, 1, 0, 2])  # errors name the row of the source, not the position here
    longest = max(len(p) for p in tokens[PROMPT_IDS])
    key = next(r[EXAMPLE_KEY] for r in tokens if len(r[PROMPT_IDS]) == longest)
    with pytest.raises(ValueError, match=rf"^--train: row {key} has a prompt of {longest} tokens, longer than the "
                                         rf"limit of {longest - 1} "):
        prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=longest - 1, name="--train")
    cut = prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=60, max_completion_length=3)
    assert max(len(c) for c in cut[COMPLETION_IDS]) == 3
    assert [c[:3] for c in tokens[COMPLETION_IDS]] == cut[COMPLETION_IDS]
    without = prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=60, use_completion=False)
    assert set(without.column_names) == {PROMPT_IDS, EXAMPLE_KEY}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({PROMPT_IDS: [], COMPLETION_IDS: [5], EXAMPLE_KEY: 7}, "row 7 has an empty prompt"),
        ({PROMPT_IDS: [5, VOCAB_SIZE], COMPLETION_IDS: [5], EXAMPLE_KEY: 7},
         f"row 7: token id {VOCAB_SIZE} in prompt_ids is not one of the tokenizer's {VOCAB_SIZE} ids"),
        ({PROMPT_IDS: [5], COMPLETION_IDS: [-1], EXAMPLE_KEY: 7}, "row 7: token id -1 in completion_ids"),
    ],
)
def test_bad_tokenized_rows_name_the_row(row, message):
    good = {PROMPT_IDS: [5, 6], COMPLETION_IDS: [7], EXAMPLE_KEY: 0}
    tokens = datasets.Dataset.from_list([good, row])
    with pytest.raises(ValueError, match=rf"^--train: {message}"):
        prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=60, name="--train")


def test_tokenized_rows_without_completions_for_a_policy_that_needs_them():
    tokens = prepared(use_completion=False)
    with pytest.raises(ValueError, match="--train: the tokenized rows have no 'completion_ids' column"):
        prepare_dataset(tokens, tiny_tokenizer(), max_prompt_length=60, name="--train")


def test_distiller_takes_tokenized_rows(tmp_path):
    trainer = tiny_distiller(tmp_path, data=prepared(max_completion_length=5), policy="dataset")
    reference = tiny_distiller(tmp_path, policy="dataset")
    assert trainer.train_dataset.to_list() == reference.train_dataset.to_list()
    with pytest.raises(ValueError, match="train dataset: row .* longer than the limit of 3"):
        tiny_distiller(tmp_path, data=prepared(), max_prompt_length=3)
