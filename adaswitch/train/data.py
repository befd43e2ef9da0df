"""Prompt/completion data for distillation: loading, tokenisation, checks and the batch collator.

A dataset is a `datasets.Dataset` or a JSONL / JSON / Parquet / CSV file with a `prompt` column and,
for the policies and evaluation that read them, a `completion` column. Rows are either plain text or
chat message lists (`[{"role": ..., "content": ...}, ...]`), in which case the tokenizer's chat
template is applied. Every bad row is reported by its index, before any training work.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from adaswitch._validation import first_line

PROMPT_IDS = "prompt_ids"
COMPLETION_IDS = "completion_ids"
EXAMPLE_KEY = "example_key"

_READERS = {
    ".jsonl": datasets.Dataset.from_json,
    ".json": datasets.Dataset.from_json,
    ".parquet": datasets.Dataset.from_parquet,
    ".csv": datasets.Dataset.from_csv,
}


def load_prompt_completion(
    source, *, name: str = "dataset", require_completion: bool = True
) -> datasets.Dataset:
    """A `datasets.Dataset` with `prompt` (and `completion`) columns from a Dataset or a file path.

    Args:
        source: a `datasets.Dataset`, or the path of a .jsonl/.json/.parquet/.csv file.
        name: what the errors call this dataset (e.g. "train dataset").
        require_completion: whether a missing `completion` column is an error.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise ValueError(
                f"{name}: unsupported file type {path.suffix!r} for {str(path)!r}; expected one of "
                f"{sorted(_READERS)}"
            )
        if not path.is_file():
            raise ValueError(f"{name}: file not found: {str(path)!r}")
        if _blank(path):
            raise ValueError(f"{name}: {str(path)!r} is empty (no rows)")
        try:
            dataset = reader(str(path))
        except Exception as exc:  # pyarrow / json errors are long; keep the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"{name}: cannot read {str(path)!r}: {first}") from exc
    elif isinstance(source, datasets.Dataset):
        dataset = source
    else:
        raise TypeError(f"{name} must be a datasets.Dataset or a file path, got {type(source).__name__}")
    required = ("prompt", "completion") if require_completion else ("prompt",)
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; found columns {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: has no rows")
    return dataset


def check_output_file(path, *, name: str = "output_path") -> Path:
    """The path a results file will be written to, checked before any work: not an existing directory, and
    its nearest existing ancestor a writable directory (missing parents are created when writing)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"{name} must be a file path, got {path!r}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a directory; give the path of a file to write")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name}: cannot create {str(p)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{name}: cannot write {str(p)!r}: {str(parent)!r} is not writable")
    return p


def _blank(path: Path) -> bool:
    """Whether a file holds nothing but whitespace (read until the first other byte)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return len(value) == 0 or all(
            not str(m.get("content", "")).strip() for m in value if isinstance(m, dict)
        )
    return False


def _template_ids(tokenizer, messages, *, add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


@contextlib.contextmanager
def _naming_row(name: str, row: int, column: str):
    """Turns a tokenizer's failure on one row (e.g. a character a word-level vocabulary without an unknown
    token cannot encode) into a ValueError naming the dataset, the row and the column."""
    try:
        yield
    except ValueError as exc:
        if str(exc).startswith(f"{name}: row "):
            raise
        raise ValueError(f"{name}: row {row}: the tokenizer cannot encode the {column}: {first_line(exc)}") from exc
    except Exception as exc:  # tokenizers raise plain Exception (e.g. "WordLevel error: Missing [UNK] token")
        raise ValueError(f"{name}: row {row}: the tokenizer cannot encode the {column}: {first_line(exc)}") from exc




def encode_example(tokenizer, prompt, completion=None, *, row: int, name: str = "dataset"):
    """(prompt_ids, completion_ids) of one row; completion_ids ends with EOS (None without a completion).

    Message-list rows go through the chat template (prompt with the generation prompt; the completion
    is what the template adds after it); text rows are tokenised as they are, the prompt with the
    tokenizer's special tokens (e.g. BOS) and the completion without.
    """
    if _is_empty(prompt):
        raise ValueError(f"{name}: row {row} has an empty prompt")
    if not isinstance(prompt, str) and not _is_messages(prompt):
        raise ValueError(
            f"{name}: row {row}: prompt must be a string or a list of chat messages "
            f"({{'role', 'content'}} dicts), got {type(prompt).__name__}"
        )
    chat = _is_messages(prompt)
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"{name}: row {row} holds chat messages but the tokenizer has no chat template")
    with _naming_row(name, row, "prompt"):
        if chat:
            prompt_ids = _template_ids(tokenizer, prompt, add_generation_prompt=True)
        else:
            prompt_ids = list(tokenizer(prompt)["input_ids"])
    if completion is None:
        return prompt_ids, None
    eos = tokenizer.eos_token_id
    if chat:
        if isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        if not _is_messages(completion):
            raise ValueError(f"{name}: row {row}: completion must be a string or a list of chat messages")
        with _naming_row(name, row, "completion"):
            full = _template_ids(tokenizer, prompt + completion, add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                f"{name}: row {row}: the chat template does not render the prompt as a prefix of "
                "prompt + completion; cannot split the completion tokens"
            )
        completion_ids = full[len(prompt_ids) :]
    else:
        if not isinstance(completion, str):
            raise ValueError(
                f"{name}: row {row}: completion must be a string when the prompt is a string, got "
                f"{type(completion).__name__}"
            )
        with _naming_row(name, row, "completion"):
            completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids.append(eos)
    return prompt_ids, completion_ids


def tokenize_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_prompt_length: int,
    max_completion_length: int | None = None,
    use_completion: bool = True,
    name: str = "dataset",
) -> datasets.Dataset:
    """Adds `prompt_ids`, `completion_ids` (when used) and `example_key` (the row index, the stable
    key of the random draws) with `datasets.map`; raises ValueError naming the first bad row.

    Completions longer than `max_completion_length` are truncated (the response budget), prompts
    longer than `max_prompt_length` are an error: cutting a prompt changes the task.
    """
    if not isinstance(max_prompt_length, int) or max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be an int >= 1, got {max_prompt_length!r}")

    def encode(row, index):
        completion = row["completion"] if use_completion else None
        if use_completion and _is_empty(completion):
            raise ValueError(f"{name}: row {index} has an empty completion")
        prompt_ids, completion_ids = encode_example(
            tokenizer, row["prompt"], completion, row=index, name=name
        )
        if len(prompt_ids) > max_prompt_length:
            raise _too_long(name, index, len(prompt_ids), max_prompt_length)
        out = {PROMPT_IDS: prompt_ids, EXAMPLE_KEY: index}
        if use_completion:
            out[COMPLETION_IDS] = (
                completion_ids[:max_completion_length] if max_completion_length else completion_ids
            )
        return out

    # Errors raised inside map propagate as they are; fingerprinting the tokenizer is not needed for a
    # one-shot, in-memory transform.
    return dataset.map(
        encode,
        with_indices=True,
        remove_columns=dataset.column_names,
        load_from_cache_file=False,
        keep_in_memory=True,
        desc=f"Tokenizing {name}",
    )


def _too_long(name: str, row: int, tokens: int, limit: int) -> ValueError:
    return ValueError(
        f"{name}: row {row} has a prompt of {tokens} tokens, longer than the limit of {limit} (the context "
        "length minus max_new_tokens, or max_prompt_length)"
    )


def is_tokenized(dataset) -> bool:
    """Whether `dataset` holds the columns `tokenize_dataset` returns (and only those)."""
    if not isinstance(dataset, datasets.Dataset):
        return False
    columns = set(dataset.column_names)
    return {PROMPT_IDS, EXAMPLE_KEY} <= columns <= {PROMPT_IDS, COMPLETION_IDS, EXAMPLE_KEY}


def check_tokenized(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_prompt_length: int,
    max_completion_length: int | None = None,
    use_completion: bool = True,
    name: str = "dataset",
) -> datasets.Dataset:
    """A dataset `tokenize_dataset` returned, checked against this run's limits (its rows may have been
    tokenized for another run): every prompt non-empty and within `max_prompt_length`, every id one of the
    tokenizer's; completions cut to `max_completion_length` (dropped when not used). Errors name the row
    by its `example_key`. Column-wise (pyarrow), so checking is cheap next to tokenizing again."""
    import pyarrow.compute as pc

    if use_completion and COMPLETION_IDS not in dataset.column_names:
        raise ValueError(f"{name}: the tokenized rows have no {COMPLETION_IDS!r} column; this policy needs completions")
    if len(dataset) == 0:
        raise ValueError(f"{name}: has no rows")
    table = dataset.with_format("arrow")[:]  # row order as the dataset shows it (a select / shuffle applied)
    keys = table[EXAMPLE_KEY].to_pylist()
    lengths = pc.list_value_length(table[PROMPT_IDS]).to_pylist()
    for i, n in enumerate(lengths):
        if not n:
            raise ValueError(f"{name}: row {keys[i]} has an empty prompt")
        if n > max_prompt_length:
            raise _too_long(name, keys[i], n, max_prompt_length)
    columns = [PROMPT_IDS] + ([COMPLETION_IDS] if use_completion else [])
    for column in columns:
        lists = table[column].combine_chunks()
        ids = pc.list_flatten(lists)
        bad = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, len(tokenizer)))
        if pc.any(bad).as_py():
            row = pc.list_parent_indices(lists).filter(bad)[0].as_py()
            token = ids.filter(bad)[0].as_py()
            raise ValueError(
                f"{name}: row {keys[row]}: token id {token} in {column} is not one of the tokenizer's "
                f"{len(tokenizer)} ids (tokenized with another tokenizer?)"
            )
    if not use_completion and COMPLETION_IDS in dataset.column_names:
        dataset = dataset.remove_columns(COMPLETION_IDS)
    if use_completion and max_completion_length:
        longest = pc.max(pc.list_value_length(table[COMPLETION_IDS])).as_py()
        if longest > max_completion_length:
            dataset = dataset.map(
                lambda row: {COMPLETION_IDS: row[COMPLETION_IDS][:max_completion_length]},
                load_from_cache_file=False,
                keep_in_memory=True,
                desc=f"Cutting {name} completions",
            )
    return dataset


def prepare_dataset(
    source,
    tokenizer,
    *,
    max_prompt_length: int,
    max_completion_length: int | None = None,
    use_completion: bool = True,
    name: str = "dataset",
) -> datasets.Dataset:
    """The rows a run trains or evaluates on: `source` read (`load_prompt_completion`) and tokenized
    (`tokenize_dataset`), or, when it is already tokenized (`is_tokenized`), checked (`check_tokenized`).
    The command line tokenizes before any model loads and hands the result on, so rows are read once."""
    limits = dict(
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        use_completion=use_completion,
        name=name,
    )
    if is_tokenized(source):
        return check_tokenized(source, tokenizer, **limits)
    data = load_prompt_completion(source, name=name, require_completion=use_completion)
    return tokenize_dataset(data, tokenizer, **limits)


def _pad(rows: Sequence[Sequence[int]], value: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [torch.as_tensor(r, dtype=torch.long) for r in rows]
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value, padding_side=side)
    ones = [torch.ones(len(r), dtype=torch.long) for r in rows]
    mask = torch.nn.utils.rnn.pad_sequence(ones, batch_first=True, padding_value=0, padding_side=side)
    return ids, mask


@dataclass
class DistillCollator:
    """Batches tokenised rows: prompts left-padded (generation appends on the right), completions
    right-padded, plus the example keys.

    Output keys: `prompt_input_ids`, `prompt_attention_mask` [B, P]; `completion_ids`,
    `completion_mask` [B, C] (when the rows carry completions); `example_keys` [B].
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, mask = _pad([f[PROMPT_IDS] for f in features], self.pad_token_id, "left")
        batch = {
            "prompt_input_ids": ids,
            "prompt_attention_mask": mask,
            "example_keys": torch.tensor([int(f[EXAMPLE_KEY]) for f in features], dtype=torch.long),
        }
        if COMPLETION_IDS in features[0]:
            cids, cmask = _pad([f[COMPLETION_IDS] for f in features], self.pad_token_id, "right")
            batch["completion_ids"] = cids
            batch["completion_mask"] = cmask
        return batch


def prompt_batch(tokenizer, prompts: Sequence, *, name: str = "prompts") -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask) of `prompts` (text or chat message lists), each tokenized as
    `encode_example` does for the Distiller (chat template with the generation prompt)."""
    rows = [{PROMPT_IDS: encode_example(tokenizer, p, row=i, name=name)[0], EXAMPLE_KEY: i}
            for i, p in enumerate(prompts)]
    batch = DistillCollator(tokenizer.pad_token_id)(rows)
    return batch["prompt_input_ids"], batch["prompt_attention_mask"]


def context_length(*models) -> int | None:
    """The shortest `max_position_embeddings` of the given models or model configs (None when none declares
    one): a config read from config.json gives the limit before any weights load."""
    lengths = [getattr(getattr(m, "config", m), "max_position_embeddings", None) for m in models]
    lengths = [n for n in lengths if isinstance(n, int) and n > 0]
    return min(lengths) if lengths else None


def prompt_limit(max_prompt_length: int | None, max_new_tokens: int, *models) -> int:
    """The longest allowed prompt: `max_prompt_length` if given, capped so that prompt + response fit
    in the models' context (`models`: models or their configs)."""
    ctx = context_length(*models)
    if ctx is not None and max_new_tokens >= ctx:
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) must be smaller than the models' context length ({ctx})"
        )
    room = None if ctx is None else ctx - max_new_tokens
    if max_prompt_length is None:
        return room if room is not None else 1 << 30
    return max_prompt_length if room is None else min(max_prompt_length, room)


# ---------------------------------------------------------------------------------------------------
# tokenizers: one tokenizer for teacher and student

# Files of a saved tokenizer. A directory with none of them (only a model) makes AutoTokenizer build an empty
# tokenizer from the model config instead of failing.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.tiktoken",
)

CROSS_TOKENIZER_HINT = (
    "distillation compares the two models' distributions token id by token id, so teacher and student "
    "must use the same tokenizer (the same token -> id vocabulary; an embedding matrix padded past it is "
    "fine); cross-tokenizer distillation (aligning two vocabularies) is not supported: pick a teacher and "
    "a student built on one tokenizer (e.g. of the same model family)"
)


def has_tokenizer(directory) -> bool:
    """Whether a local directory holds a saved tokenizer (one of `TOKENIZER_FILES`)."""
    p = Path(directory)
    return p.is_dir() and (any((p / n).is_file() for n in TOKENIZER_FILES) or any(p.glob("*.tiktoken")))


def load_tokenizer(directory, *, name: str = "model directory"):
    """The tokenizer saved in a local directory (`AutoTokenizer.from_pretrained`).

    Raises ValueError naming the directory when it holds no tokenizer file, when loading fails, or when
    the result has no ordinary tokens (what AutoTokenizer builds from a model config alone).
    """
    p = Path(directory)
    fix = "save the model's tokenizer there with tokenizer.save_pretrained(dir)"
    if not has_tokenizer(p):
        raise ValueError(
            f"{name}: no tokenizer in {str(p)!r} (none of {', '.join(TOKENIZER_FILES)}); {fix}"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except Exception as exc:  # tokenizers raise OSError, ValueError, ImportError, JSON errors, ...
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"{name}: cannot load the tokenizer in {str(p)!r}: {first}") from exc
    if not set(tok.get_vocab().values()) - set(tok.all_special_ids):
        raise ValueError(f"{name}: the tokenizer in {str(p)!r} is empty (only special tokens); {fix}")
    return tok


def local_model_dir(model) -> Path | None:
    """The local directory a model was loaded from (`from_pretrained(dir)` sets `name_or_path`), or None."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    p = Path(name).expanduser()
    return p.resolve() if p.is_dir() else None


def describe_tokenizer(label: str, tokenizer) -> str:
    """`label ('path', Class)`: what an error calls a tokenizer."""
    path = getattr(tokenizer, "name_or_path", None)
    where = f"{str(path)!r}, " if path else ""
    return f"{label} ({where}{type(tokenizer).__name__}, {len(tokenizer)} tokens)"


def vocabulary_difference(a, b) -> str | None:
    """None when the two tokenizers map the same tokens to the same ids, else a short description of how
    their vocabularies (`get_vocab()`, added tokens included) differ."""
    if a is b or not (hasattr(a, "get_vocab") and hasattr(b, "get_vocab")):
        return None
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    moved = sorted((va[t], t) for t in va if t in vb and va[t] != vb[t])
    only_a = sorted((i, t) for t, i in va.items() if t not in vb)
    only_b = sorted((i, t) for t, i in vb.items() if t not in va)
    parts = []
    if moved:
        i, t = moved[0]
        parts.append(f"{len(moved)} shared tokens have different ids (e.g. {t!r}: {i} vs {vb[t]})")
    if only_a:
        parts.append(f"{len(only_a)} tokens only in the first (e.g. {only_a[0][1]!r})")
    if only_b:
        parts.append(f"{len(only_b)} tokens only in the second (e.g. {only_b[0][1]!r})")
    return "; ".join(parts)


def check_same_tokenizer(tokenizers: Sequence[tuple[str, object]]) -> None:
    """Raises ValueError unless every tokenizer has the first one's vocabulary (token -> id map).

    Args:
        tokenizers: (label, tokenizer) pairs, e.g. [("the student's tokenizer", s), ("the teacher's", t)];
            the error names the first pair that differs by label, path and class.
    """
    (label, first), *others = tokenizers
    for other_label, other in others:
        diff = vocabulary_difference(first, other)
        if diff is not None:
            raise ValueError(
                f"{describe_tokenizer(label, first)} and {describe_tokenizer(other_label, other)} are "
                f"different tokenizers ({diff}): {CROSS_TOKENIZER_HINT}"
            )


def saved_tokenizers(models: Sequence[tuple[str, object]], known: Sequence[object] = ()) -> list[tuple[str, object]]:
    """(label, tokenizer) of the tokenizers saved with models loaded from local directories, for
    `check_same_tokenizer`: models with no local directory, directories holding no tokenizer or one that
    does not load, and the directories the `known` tokenizers were loaded from are skipped.

    Args:
        models: (role, model) pairs, e.g. [("student", student), ("teacher", teacher)].
        known: tokenizers already at hand (their `name_or_path` directories are not loaded again).
    """
    seen = set()
    for tok in known:
        path = getattr(tok, "name_or_path", None)
        if path and Path(path).expanduser().is_dir():
            seen.add(Path(path).expanduser().resolve())
    found = []
    for role, model in models:
        directory = local_model_dir(model)
        if directory is None or directory in seen or not has_tokenizer(directory):
            continue
        seen.add(directory)
        try:
            tok = load_tokenizer(directory)
        except ValueError:
            continue
        found.append((f"the tokenizer saved with the {role}", tok))
    return found
