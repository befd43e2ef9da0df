"""Data loading: files of every format, chat rows, left-padded batches, and errors that name the row."""

import datasets
import pytest
import torch
from scripts.tiny_run import rows, write_jsonl
from tiny_models import EOS_ID, PAD_ID, tiny_tokenizer

from adaswitch.train.data import DistillCollator, load_prompt_completion, prompt_limit, tokenize_dataset

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
    "{% if add_generation_prompt %}assistant :{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_file_formats(tmp_path, suffix):
    data = datasets.Dataset.from_list(rows(3))
    path = tmp_path / f"d{suffix}"
    {".jsonl": data.to_json, ".csv": data.to_csv, ".parquet": data.to_parquet}[suffix](str(path))
    loaded = load_prompt_completion(path)
    assert loaded["prompt"] == data["prompt"] and loaded["completion"] == data["completion"]


def test_tokenize_and_collate(tok):
    data = tokenize_dataset(datasets.Dataset.from_list(rows(3)), tok, max_prompt_length=20)
    assert data["example_key"] == [0, 1, 2]
    assert data[0]["prompt_ids"] == tok("what is one plus two")["input_ids"]
    assert data[0]["completion_ids"][-1] == EOS_ID
    batch = DistillCollator(PAD_ID)([data[i] for i in range(3)])
    lengths = [len(data[i]["prompt_ids"]) for i in range(3)]
    width = max(lengths)
    assert batch["prompt_input_ids"].shape == (3, width)
    for i, n in enumerate(lengths):  # prompts left-padded, completions right-padded
        assert batch["prompt_attention_mask"][i].tolist() == [0] * (width - n) + [1] * n
        assert batch["prompt_input_ids"][i, width - n :].tolist() == data[i]["prompt_ids"]
        c = data[i]["completion_ids"]
        assert batch["completion_ids"][i, : len(c)].tolist() == c
        assert batch["completion_mask"][i].sum() == len(c)
    assert torch.equal(batch["example_keys"], torch.tensor([0, 1, 2]))


def test_completion_truncated_to_budget(tok):
    data = tokenize_dataset(
        datasets.Dataset.from_list(rows(1)), tok, max_prompt_length=20, max_completion_length=3
    )
    assert len(data[0]["completion_ids"]) == 3


def test_chat_rows_use_the_template(tok):
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    row = {
        "prompt": [{"role": "user", "content": "what is two plus two"}],
        "completion": [{"role": "assistant", "content": "four"}],
    }
    data = tokenize_dataset(datasets.Dataset.from_list([row]), tok, max_prompt_length=30)
    prompt_text = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    assert data[0]["prompt_ids"] == tok(prompt_text)["input_ids"]
    assert tok.decode(data[0]["completion_ids"], skip_special_tokens=True).split()[:1] == ["four"]


def test_chat_rows_without_template_are_an_error(tok):
    row = {"prompt": [{"role": "user", "content": "hi"}], "completion": "four"}
    with pytest.raises(ValueError, match="row 0 .*no chat template"):
        tokenize_dataset(datasets.Dataset.from_list([row]), tok, max_prompt_length=30)


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "completion": "b"}])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['prompt'\]"):
        load_prompt_completion(path, name="train dataset")
    only_prompt = datasets.Dataset.from_list([{"prompt": "the cat"}])
    assert load_prompt_completion(only_prompt, require_completion=False).column_names == ["prompt"]
    with pytest.raises(ValueError, match="completion"):
        load_prompt_completion(only_prompt)


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_prompt_names_the_row(tok, bad):
    data = datasets.Dataset.from_list(rows(3) + [{"prompt": bad, "completion": "x"}])
    with pytest.raises(ValueError, match="train dataset: row 3 has an empty prompt"):
        tokenize_dataset(data, tok, max_prompt_length=30, name="train dataset")


def test_long_prompt_names_the_row(tok):
    data = datasets.Dataset.from_list(rows(2) + [{"prompt": "the cat " * 20, "completion": "x"}])
    with pytest.raises(ValueError, match="row 2 has a prompt of 40 tokens, longer than the limit of 16"):
        tokenize_dataset(data, tok, max_prompt_length=16)


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        load_prompt_completion(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_prompt_completion(tmp_path / "data.txt")
    with pytest.raises(TypeError, match="datasets.Dataset or a file path"):
        load_prompt_completion([{"prompt": "a"}])
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read"):
        load_prompt_completion(tmp_path / "broken.jsonl")
    for content in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(content)
        with pytest.raises(ValueError, match=r"^train dataset: '.*empty.jsonl' is empty \(no rows\)$"):
            load_prompt_completion(tmp_path / "empty.jsonl", name="train dataset")


def test_unencodable_character_names_the_row():
    """A word-level vocabulary without an unknown token (e.g. a character-level tokenizer) cannot encode a
    character outside it: the error names the dataset, the row and the column."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *"0123456789+="])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    char_tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    data = datasets.Dataset.from_list([{"prompt": "1+2=", "completion": "3"}, {"prompt": "1+x=", "completion": "3"},
                                       {"prompt": "2+2=", "completion": "4"}])
    with pytest.raises(ValueError, match=r"^train dataset: row 1: the tokenizer cannot encode the prompt: .*UNK"):
        tokenize_dataset(data, char_tok, max_prompt_length=16, name="train dataset")
    data = datasets.Dataset.from_list([{"prompt": "1+2=", "completion": "3"}, {"prompt": "1+1=", "completion": "é"}])
    with pytest.raises(ValueError, match=r"^train dataset: row 1: the tokenizer cannot encode the completion"):
        tokenize_dataset(data, char_tok, max_prompt_length=16, name="train dataset")


def test_prompt_limit_from_context():
    class M:
        class config:
            max_position_embeddings = 64

    assert prompt_limit(None, 16, M()) == 48
    assert prompt_limit(10, 16, M()) == 10
    assert prompt_limit(100, 16, M()) == 48
    with pytest.raises(ValueError, match="max_new_tokens"):
        prompt_limit(None, 64, M())
