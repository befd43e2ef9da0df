"""The `adaswitch` command: distill, generate, evaluate, demo, bench.

Bad input (an argument, a data row, a file) is one line on stderr naming it and exit code 2, reported
before any model loads where it can be checked then; any other failure is reported as an internal error
with exit code 1. ADASWITCH_DEBUG=1 shows the traceback.
`distill` writes only into --output-dir, which must be empty or new unless the run resumes from it or
--overwrite-output-dir is given, and may not be or lie inside --student / --teacher; a checkpoint is resumed
only by a run with its settings (adaswitch/train/resume.py). Option errors name the option as written
(`--learning-rate`, `--set max_grad_norm`, `seed (in run.yaml)`).
Models and tokenizers load from local directories (`AutoModelForCausalLM` / `AutoTokenizer`). Teacher and
student must use one tokenizer (their directories' tokenizers are compared before any model loads), and
only its ids are generated or scored (embedding rows padded past it are cut off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from adaswitch._validation import first_line

PROG = "adaswitch"
EXIT_ERROR = 2  # bad input: one line naming what to change
EXIT_INTERNAL = 1  # anything else: a bug or the environment, shown as an internal error

# DistillConfig fields offered as options of `distill` (all others: --config run.yaml or --set KEY=VALUE).
POLICY_FIELDS = (
    "policy",
    "lmbda",
    "skd_top_k",
    "window",
    "k",
    "switch_divergence",
    "warmup",
    "min_divergence",
    "max_divergence",
    "switch_temperature",
    "switch_position",
    "switch_positions",
    "switch_weights",
)
SAMPLING_FIELDS = (
    "student_temperature",
    "student_top_k",
    "student_top_p",
    "teacher_temperature",
    "teacher_top_k",
    "teacher_top_p",
    "max_new_tokens",
    "lookahead",
    "guidance",
    "reuse_teacher_states",
)
LOSS_FIELDS = (
    "loss_kind",
    "beta",
    "alpha",
    "loss_temperature",
    "token_mask",
    "loss_reduction",
    "weight_hard_loss",
    "weight_soft_loss",
    "hard_label_mask",
    "sampled_discount",
    "sampled_importance_cap",
    "max_prompt_length",
)
TRAINING_FIELDS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "seed",
    "report_to",
    "bf16",
    "use_cpu",
)
PATH_KEYS = ("teacher", "student", "train", "eval", "output_dir")

DESCRIPTION = """\
Adaptive-switching knowledge distillation of small language models.

commands:
  distill    train a student from a teacher with a generation policy (student, teacher, dataset,
             mixed, skd, adaswitch; the controls fixed_switch, random_switch) on a prompt/completion file
  generate   show what a policy generates: the teacher-produced span is marked, with the switch position
  evaluate   accuracy (answer after a final-answer marker) and teacher-forced KL of a model on a file
  demo       the end-to-end demo on the embedded task (teacher -> distilled students -> plots)
  bench      run the benchmark scripts under benchmarks/

examples:
  adaswitch distill --teacher teacher/ --student student/ --train train.jsonl --output-dir out/ \\
      --policy adaswitch --window 8 --k 2.0 --max-steps 200
  adaswitch distill --config run.yaml
  adaswitch generate --teacher teacher/ --student student/ --prompt "what is two plus two ?"
  adaswitch evaluate --model out/ --data test.jsonl --teacher teacher/

`adaswitch COMMAND --help` lists each command's options.
"""


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


# What the library and this command raise for input they refuse (argument checks, data rows, files):
# printed as one line with exit code 2. Any other exception is an internal error.
INPUT_ERRORS = (CliError, ValueError, TypeError, OSError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with a pointer to --help) instead of usage + error."""

    def error(self, message):
        raise CliError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------------------------------------------
# options built from DistillConfig's documented fields


def _config_fields() -> dict[str, dataclasses.Field]:
    from adaswitch.train.config import DistillConfig

    return {f.name: f for f in dataclasses.fields(DistillConfig)}


def _field_type(f: dataclasses.Field):
    """The argparse type of a dataclass field, from its annotation (a type or, with postponed
    annotations, a string such as "int | None")."""
    if isinstance(f.default, bool):
        return bool
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    name = name.replace("typing.", "").replace("Optional[", "").split("|")[0].strip()
    if name.startswith("list[") and name.endswith("]"):  # list[int] -> int (the option takes several values)
        name = name[5:-1].strip()
    return {"float": _float, "int": int, "bool": bool}.get(name, str)


def _is_list_field(f: dataclasses.Field) -> bool:
    return str(f.type).replace("typing.", "").replace("Optional[", "").strip().lower().startswith("list[")


def _float(text: str) -> float:
    try:
        return float(text)  # accepts "inf"
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_fields(parser, group_title: str, names, fields) -> None:
    group = parser.add_argument_group(group_title)
    for name in names:
        f = fields[name]
        flag = "--" + name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        kind = _field_type(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        if name == "report_to":
            group.add_argument(
                flag,
                dest=name,
                nargs="+",
                default=argparse.SUPPRESS,
                metavar="TOOL",
                help="integrations to log to, e.g. tensorboard wandb (default: none)",
            )
        elif kind is bool:
            group.add_argument(
                flag, dest=name, action="store_true", default=argparse.SUPPRESS, help=help_text
            )
        else:
            choices = f.metadata.get("choices")
            shown = getattr(default, "value", default)
            group.add_argument(
                flag,
                dest=name,
                type=kind,
                nargs="+" if _is_list_field(f) else None,
                choices=choices,
                default=argparse.SUPPRESS,
                metavar=None if choices else {int: "N", _float: "X"}.get(kind, "VALUE"),
                help=f"{help_text} (default: {shown})",
            )


# ---------------------------------------------------------------------------------------------------
# loading


def _model_dir(option: str, path) -> Path:
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise CliError(f"{option}: not a directory: {str(p)!r}")
    if not (p / "config.json").is_file():
        raise CliError(
            f"{option}: {str(p)!r} is not a saved model (no config.json); save one with "
            "model.save_pretrained(dir)"
        )
    return p


def load_model(option: str, path):
    """The causal LM saved in a directory; a file that cannot be loaded (a truncated copy, a pickle that is
    not weights-only) is an error naming the directory, not an internal error."""
    from transformers import AutoModelForCausalLM

    p = _model_dir(option, path)
    try:
        return AutoModelForCausalLM.from_pretrained(str(p))
    except (ImportError, MemoryError):
        raise
    except Exception as exc:
        weights = sorted(f.name for f in p.iterdir() if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
        raise CliError(
            f"{option}: cannot load the model in {str(p)!r} ({type(exc).__name__}: {first_line(exc)}); its "
            f"weights ({', '.join(weights) or 'none found'}) may be damaged (a truncated copy) or not weights-only: "
            "save the model again with model.save_pretrained(dir)"
        ) from exc


def load_tokenizer(option: str, path):
    """The tokenizer saved in a model directory; a clear error when the directory holds none."""
    from adaswitch.train import data

    p = _model_dir(option, path)
    try:
        tok = data.load_tokenizer(p, name=option)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise CliError(f"{option}: the tokenizer in {str(p)!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def shared_tokenizer(dirs: list[tuple[str, Path]]):
    """{option: tokenizer} of the model directories that hold a tokenizer (in the order given), after
    checking that they are one tokenizer (same token -> id vocabulary); an error when none holds one.
    Run before any model is loaded."""
    from adaswitch.train import data

    found = {option: load_tokenizer(option, d) for option, d in dirs if data.has_tokenizer(d)}
    if not found:
        where = " nor ".join(f"{option} {str(d)!r}" for option, d in dirs)
        raise CliError(
            f"no tokenizer in {where} (none of {', '.join(data.TOKENIZER_FILES)}); save the tokenizer "
            "with tokenizer.save_pretrained(dir) in one of them"
        )
    _check_one_tokenizer(found)
    return found


def _check_one_tokenizer(tokenizers: dict) -> None:
    from adaswitch.train import data

    try:
        data.check_same_tokenizer([(f"the {option} tokenizer", tok) for option, tok in tokenizers.items()])
    except ValueError as exc:
        raise CliError(str(exc)) from exc




# ---------------------------------------------------------------------------------------------------
# distill


def _distill_parser(sub, fields):
    p = sub.add_parser(
        "distill",
        help="train a student from a teacher with a generation policy",
        description="Distil a teacher into a student. Paths and any DistillConfig field can also come from "
        "--config run.yaml (keys: teacher, student, train, eval, output_dir and DistillConfig "
        "fields); options given on the command line override the file. The final model and "
        "tokenizer are saved to --output-dir; checkpoints go to --output-dir/checkpoint-N. A non-empty "
        "--output-dir is refused unless the run resumes from it or --overwrite-output-dir is given.",
    )
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--config", metavar="RUN.YAML", help="YAML file of settings (see above)")
    g.add_argument(
        "--teacher",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="teacher model directory (save_pretrained); its tokenizer is used unless the student "
        "directory holds one (when both hold one, they must be the same tokenizer)",
    )
    g.add_argument("--student", metavar="DIR", default=argparse.SUPPRESS, help="student model directory")
    g.add_argument(
        "--train",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="training data: .jsonl/.json/.parquet/.csv with a prompt column (and completion, for "
        "policies dataset and mixed)",
    )
    g.add_argument("--eval", metavar="FILE", default=argparse.SUPPRESS, help="evaluation data, same format")
    g.add_argument(
        "--output-dir",
        dest="output_dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where checkpoints and the final model go",
    )
    g.add_argument(
        "--resume-from-checkpoint",
        dest="resume",
        metavar="DIR|last",
        default=None,
        help="resume from a checkpoint directory, or `last` for the newest under --output-dir",
    )
    g.add_argument(
        "--overwrite-output-dir",
        dest="overwrite_output_dir",
        action="store_true",
        help="write into a non-empty --output-dir: the run's files replace those of the same names and its "
        "checkpoint-N directories are removed when training starts (default: a non-empty --output-dir is "
        "refused unless the run resumes from it)",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="any other DistillConfig/TrainingArguments field, value parsed as YAML (repeatable)",
    )
    _add_fields(p, "policy (where response tokens come from)", POLICY_FIELDS, fields)
    _add_fields(p, "sampling", SAMPLING_FIELDS, fields)
    _add_fields(p, "loss", LOSS_FIELDS, fields)
    _add_fields(p, "training (transformers.TrainingArguments)", TRAINING_FIELDS, fields)
    p.set_defaults(run=_run_distill)
    return p


def _yaml_loader():
    """A safe YAML loader with YAML 1.2's core schema for scalars: only true/false are booleans (YAML 1.1
    also reads yes/no/on/off as booleans, so `save_strategy: no` would become False), and 1e-4 is a
    number (YAML 1.1 needs a dot)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    core = [
        ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        (
            "tag:yaml.org,2002:float",
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
            "-+.0123456789",
        ),
    ]
    for tag, rx, first in core:
        Loader.add_implicit_resolver(tag, re.compile(rx), list(first))

    def construct_int(loader, node):
        text = loader.construct_scalar(node)
        return int(text, 8) if text.startswith("0o") else int(text, 0 if text.startswith("0x") else 10)

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return Loader


def _load_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)


def _read_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CliError(f"--config: file not found: {path!r}")
    try:
        data = _load_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"--config: {path!r} is not valid YAML: {first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise CliError(f"--config: {path!r} must hold a mapping of settings, got {type(data).__name__}")
    return data


def _parse_override(text: str):
    import yaml

    if "=" not in text:
        raise CliError(f"--set: expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip().replace("-", "_"), (value, _load_yaml(value))
    except yaml.YAMLError as exc:
        raise CliError(f"--set {key}: cannot parse {value!r}: {first_line(exc)}") from exc


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "y": True, "1": True,
               "false": False, "no": False, "off": False, "n": False, "0": False}


def _field_members(f: dataclasses.Field) -> set:
    """The plain types a DistillConfig field admits (`int | None` -> {int, NoneType}; enums count as str)."""
    import enum
    import typing

    from adaswitch.train.config import DistillConfig

    try:
        hint = typing.get_type_hints(DistillConfig)[f.name]
    except Exception:  # an annotation that does not resolve: no coercion
        return set()
    members = set()
    for t in typing.get_args(hint) or (hint,):
        t = typing.get_origin(t) or t
        members.add(str if isinstance(t, type) and issubclass(t, enum.Enum) else t)
    return members


def typed_value(key: str, value, fields, *, raw: str | None = None, source: str = "--set"):
    """A setting's value made to fit its field's type: YAML's reading of it (core schema: only true / false
    are booleans, so `save_strategy=no` stays text), except that a number given to a text field stays
    text, yes/no/on/off given to a boolean field is a boolean, and a text number (e.g. `inf`) given to a
    numeric field is a number; anything else that does not fit is an error naming the setting."""
    f = fields.get(key)
    if f is None:
        return value
    members = _field_members(f)
    if not members:
        return value
    text = (raw if raw is not None else str(value)).strip()
    if isinstance(value, bool):  # true / false (transformers takes `fsdp=true` although fsdp is typed as text)
        return value
    if isinstance(value, (int, float)):
        if float in members or (int in members and isinstance(value, int)):
            return value
        if str in members:
            return text
        raise CliError(f"{source} {key}: expected {_describe(members)}, got {text!r}")
    if isinstance(value, str):
        if str in members:
            return value
        if bool in members and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        if float in members:
            try:
                return float(value)  # inf, nan
            except ValueError:
                pass
        if members & {bool, int, float}:
            raise CliError(f"{source} {key}: expected {_describe(members)}, got {text!r}")
    return value


def _describe(members: set) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null",
             list: "a list", dict: "a mapping"}
    return " or ".join(names[m] for m in (bool, int, float, str, list, dict, type(None)) if m in members)


def distill_settings(args, fields, sources: dict | None = None) -> dict:
    """The merged settings: YAML file, then --set, then explicit options (later wins); each value from the
    file or --set is read against its field's type (`typed_value`). `sources`, when given, receives each
    setting's name as the user wrote it (`--learning-rate`, `--set learning_rate`, `learning_rate in
    run.yaml`), for the error messages."""
    sources = {} if sources is None else sources
    settings = _read_yaml(args.config) if args.config else {}
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()}
    settings = {k: typed_value(k, v, fields, source="--config") for k, v in settings.items()}
    sources.update({k: f"{k} (in {args.config})" for k in settings})
    for key, (raw, value) in (_parse_override(o) for o in args.overrides):
        settings[key] = typed_value(key, value, fields, raw=raw)
        sources[key] = f"--set {key}"
    skip = {"config", "overrides", "resume", "run", "command", "overwrite_output_dir"}
    explicit = {k: v for k, v in vars(args).items() if k not in skip}
    settings.update(explicit)
    sources.update({k: "--" + k.replace("_", "-") for k in explicit})
    unknown = sorted(k for k in settings if k not in fields and k not in PATH_KEYS)
    if unknown:
        raise CliError(f"unknown setting(s) {unknown}: not DistillConfig fields nor one of {list(PATH_KEYS)}")
    for key in ("teacher", "student", "train", "output_dir"):
        if settings.get(key) in (None, ""):
            raise CliError(f"missing --{key.replace('_', '-')} (or `{key}:` in --config)")
    return settings


def _run_distill(args) -> int:
    fields = _config_fields()
    sources: dict = {}
    settings = distill_settings(args, fields, sources)
    paths = {k: settings.pop(k) for k in PATH_KEYS if k in settings and k != "output_dir"}
    output_dir = settings["output_dir"] = _output_dir(settings["output_dir"])
    for key in ("student", "teacher"):
        _model_dir(f"--{key}", paths[key])
    _check_apart_from_models(output_dir, paths)
    config = _distill_config(settings, sources)  # validates every field before any model is loaded
    resume = _resume_checkpoint(args.resume, output_dir, config)
    _check_output_dir_free(output_dir, resume, args.overwrite_output_dir)
    existed = os.path.lexists(output_dir)
    try:
        return _distill(args, config, paths, resume)
    except BaseException:
        if not existed:
            _remove_if_empty(output_dir)  # a failed run leaves nothing behind
        raise


def _distill_config(settings: dict, sources: dict):
    """DistillConfig(**settings); an error that starts with a setting's name names it as the user wrote it."""
    from adaswitch.train.config import DistillConfig

    try:
        return DistillConfig(**settings)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        head, _, rest = text.partition(" ")
        if head in sources:
            raise CliError(f"{sources[head]} {rest}") from exc
        raise


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_apart_from_models(output_dir: str, paths: dict) -> None:
    """--output-dir may not be, or lie inside, --student or --teacher: the run's files would replace the
    input model's (resolved paths, so a link or `..` is seen through)."""
    out = Path(output_dir).resolve()
    for key in ("student", "teacher"):
        if paths.get(key) in (None, ""):
            continue
        model = Path(str(paths[key])).expanduser().resolve()
        if _inside(out, model):
            where = "is" if out == model else "lies inside"
            raise CliError(
                f"--output-dir: {output_dir!r} {where} --{key} {str(paths[key])!r}: the run would write its model "
                f"over the {key}'s files; choose another --output-dir"
            )


def _check_output_dir_free(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """A non-empty --output-dir is refused, naming what it holds, unless the run resumes from a checkpoint in
    it or --overwrite-output-dir says to replace what the run writes there."""
    if overwrite or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    if not entries:
        return
    if resume is not None and _inside(Path(resume).resolve(), Path(output_dir).resolve()):
        return
    shown = ", ".join(entries[:4]) + (f" and {len(entries) - 4} more" if len(entries) > 4 else "")
    raise CliError(
        f"--output-dir: {output_dir!r} is not empty (it holds {shown}); the run would write its model and "
        "checkpoints over them: choose an empty or new directory, resume the run there with "
        "--resume-from-checkpoint last, or pass --overwrite-output-dir"
    )


def _remove_earlier_run(output_dir: str) -> None:
    """--overwrite-output-dir: the checkpoints of the run written there before (checkpoint-N, and leftovers
    of a killed save) go, so that a later --resume-from-checkpoint last cannot pick one of them."""
    import re
    import shutil

    from adaswitch.train.checkpoint import STAGING_PREFIX

    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path) and (
                re.fullmatch(r"checkpoint-\d+", name) or name.startswith(STAGING_PREFIX)):
            shutil.rmtree(path)


def _output_dir(path) -> str:
    """--output-dir checked before any work: a directory or a path that can be created as one."""
    p = Path(str(path)).expanduser()
    if p.exists() and not p.is_dir():
        raise CliError(f"--output-dir: {str(p)!r} exists and is not a directory")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--output-dir: cannot create {str(p)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK):
        raise CliError(f"--output-dir: cannot write under {str(parent)!r} (permission denied)")
    return str(p)


def _remove_if_empty(path: str) -> None:
    """Removes a directory tree that holds no file (only empty directories)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return
    for _root, _dirs, files in os.walk(path):
        if files:
            return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _resume_checkpoint(resume, output_dir: str, config):
    """--resume-from-checkpoint checked before any model loads: `last` becomes the newest complete
    checkpoint-N under output_dir, a directory must hold a checkpoint this run may resume
    (`adaswitch.train.resume.check_resume`: same settings, steps left, optimizer state, whole weights)."""
    path = _find_checkpoint(resume, output_dir)
    if path is not None:
        from adaswitch.train.resume import check_resume

        try:
            check_resume(path, config, option="--resume-from-checkpoint")
        except ValueError as exc:
            raise CliError(str(exc)) from exc
    return path


def _find_checkpoint(resume, output_dir: str):
    if resume is None:
        return None
    from transformers.trainer import TRAINER_STATE_NAME

    from adaswitch.train.checkpoint import recover

    if resume == "last":
        from transformers.trainer_utils import get_last_checkpoint

        found = None
        if os.path.isdir(output_dir):
            recover(output_dir)  # a checkpoint replaced while the process was killed is put back first
            found = get_last_checkpoint(output_dir)
        if found is None:
            raise CliError(f"--resume-from-checkpoint last: no checkpoint-N under {output_dir!r}")
        return found
    p = Path(resume).expanduser()
    if not p.is_dir():
        raise CliError(f"--resume-from-checkpoint: not a directory: {str(p)!r}")
    if not (p / TRAINER_STATE_NAME).is_file():
        raise CliError(
            f"--resume-from-checkpoint: {str(p)!r} is not a checkpoint (no {TRAINER_STATE_NAME}); give a "
            "checkpoint-N directory or `last`"
        )
    return str(p)


def load_model_config(option: str, path):
    """A model directory's config.json (no weights): what the checks before loading need (context length)."""
    from transformers import AutoConfig

    p = _model_dir(option, path)
    try:
        return AutoConfig.from_pretrained(str(p))
    except Exception as exc:  # JSON errors, unknown model types, ...
        raise CliError(f"{option}: cannot read the model config in {str(p)!r}: {first_line(exc)}") from exc


def _distill(args, config, paths: dict, resume) -> int:
    from adaswitch.train.data import prepare_dataset, prompt_limit

    student_dir = _model_dir("--student", paths["student"])
    teacher_dir = _model_dir("--teacher", paths["teacher"])
    # One tokenizer for both models (the student's, else the teacher's), checked before anything else.
    tokenizers = shared_tokenizer([("--student", student_dir), ("--teacher", teacher_dir)])
    tokenizer = next(iter(tokenizers.values()))
    # Every data row is read, checked and tokenized before any weights load: the prompt limit needs only the
    # models' context lengths, from their config.json. The Distiller takes the tokenized rows as they are.
    limit = prompt_limit(
        config.max_prompt_length,
        config.max_new_tokens,
        load_model_config("--student", student_dir),
        load_model_config("--teacher", teacher_dir),
    )
    data = {
        option: prepare_dataset(
            paths[key],
            tokenizer,
            max_prompt_length=limit,
            max_completion_length=config.max_new_tokens,
            use_completion=config.uses_completions,
            name=option,
        )
        for key, option in (("train", "--train"), ("eval", "--eval"))
        if paths.get(key)
    }
    student = load_model("--student", student_dir)
    teacher = load_model("--teacher", teacher_dir)

    from adaswitch.train.distiller import Distiller

    trainer = Distiller(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=data["--train"],
        eval_dataset=data.get("--eval"),
        processing_class=tokenizer,
        teacher_processing_class=tokenizers.get("--teacher"),
    )
    if args.overwrite_output_dir and resume is None:
        if trainer.args.should_save:  # one process removes, the others wait
            _remove_earlier_run(config.output_dir)
        trainer.accelerator.wait_for_everyone()
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        print(f"saved the distilled student to {config.output_dir}")
    return 0


# ---------------------------------------------------------------------------------------------------
# generate


def _generate_parser(sub, fields):
    p = sub.add_parser(
        "generate",
        help="show the mixed sequences a policy generates",
        description="Generate responses with a policy and print them with the teacher-produced tokens marked "
        "([[...]], or yellow on a terminal) and each row's switch position.",
    )
    p.add_argument("--teacher", metavar="DIR", required=True, help="teacher model directory")
    p.add_argument("--student", metavar="DIR", required=True, help="student model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    src.add_argument(
        "--prompts", metavar="FILE", help="a .jsonl/.json/.parquet/.csv file with a prompt column"
    )
    p.add_argument(
        "--raw-prompt",
        action="store_true",
        help="send each --prompt TEXT as it is; by default a tokenizer with a chat template gets it as one "
        "user message through the template (as the data files' message lists are)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (default: 0)")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colour the teacher span instead of brackets (default: auto = when stdout is a terminal)",
    )
    _add_fields(p, "policy", POLICY_FIELDS, fields)
    _add_fields(p, "sampling", SAMPLING_FIELDS, fields)
    p.set_defaults(run=_run_generate)
    return p


def _spans(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs (start, end, flag) of equal flags."""
    out, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            out.append((start, i, flags[start]))
            start = i
    return out


def render_response(tokenizer, ids: list[int], from_teacher: list[bool], color: bool) -> str:
    """The response text with the teacher-produced runs marked. Spans are cut from the decoding of growing
    prefixes, so tokenizers whose pieces merge across boundaries still render correctly."""
    text, pieces = "", []
    for start, end, teacher in _spans(from_teacher):
        full = tokenizer.decode(ids[:end], skip_special_tokens=True)
        piece = (
            full[len(text) :]
            if full.startswith(text)
            else tokenizer.decode(ids[start:end], skip_special_tokens=True)
        )
        text = full
        if teacher and piece.strip():
            lead = piece[: len(piece) - len(piece.lstrip())]
            body = piece.strip()
            piece = f"{lead}\033[33m{body}\033[0m" if color else f"{lead}[[{body}]]"
        pieces.append(piece)
    return "".join(pieces)


def _run_generate(args) -> int:
    fields = _config_fields()
    settings = {k: v for k, v in vars(args).items() if k in fields}

    config = _distill_config(dict(output_dir=os.devnull, report_to=[], use_cpu=True, **settings),
                             {k: "--" + k.replace("_", "-") for k in settings})
    policy = config.build_policy()
    if policy is None:
        raise CliError("--policy dataset generates nothing; choose student, teacher, mixed, skd or adaswitch")
    if config.policy == "mixed":
        raise CliError(
            "--policy mixed needs dataset completions; `generate` shows student, teacher, skd and adaswitch"
        )
    if args.prompts:
        from adaswitch.train.data import load_prompt_completion

        prompts = list(
            load_prompt_completion(args.prompts, name="--prompts", require_completion=False)["prompt"]
        )
    else:
        prompts = args.prompt
    teacher_dir, student_dir = _model_dir("--teacher", args.teacher), _model_dir("--student", args.student)
    tokenizers = shared_tokenizer([("--teacher", teacher_dir), ("--student", student_dir)])
    tokenizer = next(iter(tokenizers.values()))
    from adaswitch.train.data import DistillCollator, encode_example

    if args.prompt and not args.raw_prompt and getattr(tokenizer, "chat_template", None):
        inputs = [[{"role": "user", "content": p}] for p in prompts]  # an instruct model's own format
    else:
        inputs = prompts
    name = "--prompts" if args.prompts else "--prompt"
    rows = [
        {"prompt_ids": encode_example(tokenizer, p, None, row=i, name=name)[0], "example_key": i}
        for i, p in enumerate(inputs)
    ]
    batch = DistillCollator(tokenizer.pad_token_id)(rows)
    student, teacher = load_model("--student", student_dir), load_model("--teacher", teacher_dir)
    import torch

    from adaswitch.engine.generate import generate
    from adaswitch.policies import AdaSwitch
    from adaswitch.train.finite import first_non_finite

    for option, model, d in (("--student", student, student_dir), ("--teacher", teacher, teacher_dir)):
        bad = first_non_finite(model)
        if bad is not None:  # its logits are NaN: every "token" would be the argmax of NaN, id 0
            raise CliError(f"{option}: the weights in {str(d)!r} are not finite ({bad} holds NaN or inf); "
                           "nothing can be generated from them")

    with torch.no_grad():
        out = generate(
            student.eval(),
            teacher.eval(),
            batch["prompt_input_ids"],
            batch["prompt_attention_mask"],
            policy=policy,
            max_new_tokens=config.max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tokenizer=tokenizer,  # only the tokenizer's ids are sampled (not padded embedding rows)
            seed=args.seed,
            example_keys=batch["example_keys"],
            lookahead=config.lookahead,
            guidance=config.guidance,
        )
    if isinstance(policy, AdaSwitch) and bool(out.divergence.isnan().all()):
        raise CliError(
            "every divergence of this run was NaN (the models' logits are not finite, e.g. an fp16 overflow): the "
            "switching rule never fired and the tokens are draws from NaN logits"
        )
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    for i, prompt in enumerate(prompts):
        n = int(out.lengths[i])
        ids = out.response[i, :n].tolist()
        flags = out.from_teacher[i, :n].tolist()
        shown = prompt if isinstance(prompt, str) else json.dumps(prompt)
        print(f"[{i}] prompt: {shown}")
        print(f"    response: {render_response(tokenizer, ids, flags, color)}")
        switch = int(out.switch_position[i])
        teacher_tokens = sum(flags)
        where = f"switch at response token {switch}" if switch >= 0 else "no switch"
        print(f"    {where}; {teacher_tokens}/{n} tokens from the teacher")
    return 0


# ---------------------------------------------------------------------------------------------------
# evaluate


def _evaluate_parser(sub):
    p = sub.add_parser(
        "evaluate",
        help="accuracy and teacher-forced KL of a model on a prompt/completion file",
        description="Greedy-decode every prompt and compare the text after the final-answer marker with the "
        "reference completion's; with --teacher also report the mean token KL(teacher || model) "
        "on the reference completions. Prints the results as JSON.",
    )
    p.add_argument(
        "--model", metavar="DIR", required=True, help="model directory (e.g. a distill --output-dir)"
    )
    p.add_argument(
        "--data",
        metavar="FILE",
        required=True,
        help=".jsonl/.json/.parquet/.csv with prompt and completion columns",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="teacher model directory for the teacher-forced KL (same tokenizer as --model)",
    )
    p.add_argument("--answer-marker", default="####", help="final-answer marker (default: ####)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="greedy decoding budget (default: 256, less if the prompts would not fit the context)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default: 8)")
    p.add_argument("--output", metavar="FILE", help="also write the results (with every example) as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=_run_evaluate)
    return p


def _run_evaluate(args) -> int:
    from adaswitch.train import data
    from adaswitch.train.evaluate import evaluate

    model_dir = _model_dir("--model", args.model)
    if args.output is not None:  # before any work, not after the whole evaluation
        try:
            data.check_output_file(args.output, name="--output")
        except (ValueError, TypeError) as exc:
            raise CliError(str(exc)) from exc
    tokenizer = load_tokenizer("--model", model_dir)  # the model's own tokenizer is required
    teacher_dir = _model_dir("--teacher", args.teacher) if args.teacher else None
    teacher_tokenizer = None
    if teacher_dir is not None and data.has_tokenizer(teacher_dir):  # the KL compares ids: one tokenizer
        teacher_tokenizer = load_tokenizer("--teacher", teacher_dir)
        _check_one_tokenizer({"--model": tokenizer, "--teacher": teacher_tokenizer})
    model = load_model("--model", model_dir)
    teacher = load_model("--teacher", teacher_dir) if teacher_dir is not None else None
    from adaswitch.train.atomic import WriteError

    try:
        results = evaluate(
            model,
            tokenizer,
            args.data,
            answer_marker=args.answer_marker,
            teacher=teacher,
            teacher_tokenizer=teacher_tokenizer,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            output_path=args.output,
            progress=not args.no_progress,
        )
    except WriteError as exc:  # the only file evaluate writes
        raise CliError(f"--output: {exc}") from exc
    summary = {k: v for k, v in results.items() if k != "examples"}
    if isinstance(summary.get("teacher_kl"), float) and math.isnan(summary["teacher_kl"]):
        summary["teacher_kl"] = None
    print(json.dumps(summary, indent=2))
    return 0


# ---------------------------------------------------------------------------------------------------
# demo and bench


def _run_demo(argv: list[str]) -> int:
    try:
        from adaswitch.demo.run import main as demo_main
    except ImportError as exc:
        raise CliError(f"the demo is not available in this installation ({first_line(exc)})") from exc
    return int(demo_main(argv) or 0)


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _bench_parser(sub):
    p = sub.add_parser(
        "bench",
        help="run the benchmark scripts under benchmarks/",
        description="Run benchmarks/bench_NAME.py scripts of a source checkout (all of them, or the NAMEs "
        "given), each in its own Python process. Each prints ratios against baselines measured "
        "in the same run and writes its results to benchmarks/results/.",
    )
    p.add_argument(
        "names", nargs="*", metavar="NAME", help="benchmarks to run, e.g. divergence loss (default: all)"
    )
    p.add_argument("--list", action="store_true", help="list the available benchmarks and exit")
    p.set_defaults(run=_run_bench)
    return p


def _run_bench(args) -> int:
    root = benchmarks_dir()
    scripts = {s.stem.removeprefix("bench_"): s for s in sorted(root.glob("bench_*.py"))}
    if not scripts:
        raise CliError(f"no benchmark scripts found under {str(root)!r} (they ship with a source checkout)")
    if args.list:
        print("\n".join(scripts))
        return 0
    unknown = [n for n in args.names if n not in scripts]
    if unknown:
        raise CliError(f"unknown benchmark(s) {unknown}; available: {sorted(scripts)}")
    failed = []
    for name in args.names or list(scripts):
        print(f"== bench {name} ({scripts[name].relative_to(root.parent)})", flush=True)
        if subprocess.call([sys.executable, str(scripts[name])], cwd=root.parent) != 0:
            failed.append(name)
    if failed:
        raise CliError(f"benchmark(s) failed: {failed}")
    return 0


# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fields = _config_fields()
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from adaswitch import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _distill_parser(sub, fields)
    _generate_parser(sub, fields)
    _evaluate_parser(sub)
    sub.add_parser(
        "demo", help="the end-to-end demo (`adaswitch demo --help` for its options)", add_help=False
    )
    _bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "demo":  # the demo parses its own options
            return _run_demo(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_ERROR
        return args.run(args)
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line, not a traceback
        if os.environ.get("ADASWITCH_DEBUG"):
            raise
        where = f"{PROG} {command}" if command and not command.startswith("-") else PROG
        if isinstance(exc, INPUT_ERRORS):
            ours = type(exc).__module__.startswith(PROG)  # e.g. WriteError: its message says what happened
            kind = "" if ours or isinstance(exc, (CliError, ValueError, TypeError)) else f"{type(exc).__name__}: "
            print(f"{where}: error: {kind}{first_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        print(
            f"{where}: internal error: {type(exc).__name__}: {first_line(exc)} (not a problem with the "
            "input: set ADASWITCH_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
