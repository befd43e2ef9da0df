"""The demo task: integer arithmetic solved as a worked chain of steps.

"7+8*3-5=" -> "8*3=24;7+24=31;31-5=26####26". Products are worked first, then sums and differences left
to right; every step copies a number produced earlier, so one wrong step corrupts all later ones
(exposure bias matters). Every intermediate value stays in [0, max_value] (rejection sampling), which
keeps the character vocabulary tiny and the numbers at most a few digits.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from adaswitch.train.evaluate import extract_answer as evaluate_extract_answer

ANSWER_MARKER = "####"
STEP_SEPARATOR = ";"
CHARS = "0123456789+-*=;#"


@dataclass(frozen=True)
class TaskConfig:
    """Difficulty knobs. More operands = longer chains (more room for errors to compound)."""

    min_operands: int = 3
    max_operands: int = 5
    max_operand: int = 9
    max_value: int = 99
    ops: str = "+-*"

    def __post_init__(self):
        if not isinstance(self.min_operands, int) or self.min_operands < 2:
            raise ValueError(f"min_operands must be an int >= 2, got {self.min_operands!r}")
        if not isinstance(self.max_operands, int) or self.max_operands < self.min_operands:
            raise ValueError(f"max_operands must be an int >= min_operands, got {self.max_operands!r}")
        if not isinstance(self.max_operand, int) or self.max_operand < 1:
            raise ValueError(f"max_operand must be an int >= 1, got {self.max_operand!r}")
        if not isinstance(self.max_value, int) or self.max_value < self.max_operand:
            raise ValueError(f"max_value must be an int >= max_operand, got {self.max_value!r}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"ops must be a non-empty subset of '+-*', got {self.ops!r}")


def solve(operands: list[int], ops: list[str]) -> tuple[list[str], list[int]]:
    """The worked steps ("a*b=c") and every intermediate value, products first then left to right."""
    if len(operands) != len(ops) + 1:
        raise ValueError(f"need len(operands) == len(ops) + 1, got {len(operands)} and {len(ops)}")
    values, pending = list(operands), list(ops)
    steps, results = [], []
    for phase in ("*", "+-"):
        i = 0
        while i < len(pending):
            if pending[i] in phase:
                a, b, op = values[i], values[i + 1], pending[i]
                c = a * b if op == "*" else a + b if op == "+" else a - b
                steps.append(f"{a}{op}{b}={c}")
                results.append(c)
                values[i : i + 2] = [c]
                del pending[i]
            else:
                i += 1
    return steps, results


def make_example(rng: random.Random, config: TaskConfig) -> dict:
    """One problem whose intermediates all lie in [0, max_value] (retries until one does)."""
    while True:
        n = rng.randint(config.min_operands, config.max_operands)
        operands = [rng.randint(0, config.max_operand) for _ in range(n)]
        ops = [rng.choice(config.ops) for _ in range(n - 1)]
        steps, results = solve(operands, ops)
        if all(0 <= r <= config.max_value for r in results):
            break
    prompt = "".join(f"{x}{op}" for x, op in zip(operands, ops)) + f"{operands[-1]}="
    answer = str(results[-1])
    completion = STEP_SEPARATOR.join(steps) + ANSWER_MARKER + answer
    return {"prompt": prompt, "completion": completion, "answer": answer, "num_steps": len(steps)}


def build_dataset(num_train: int = 20000, num_eval: int = 500, *, seed: int = 0, config: TaskConfig | None = None):
    """A `datasets.DatasetDict` with "train" and "eval" splits (columns prompt, completion, answer,
    num_steps), a pure function of the arguments. Eval prompts never occur in train."""
    from datasets import Dataset, DatasetDict

    for name, value in (("num_train", num_train), ("num_eval", num_eval)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config or TaskConfig()
    rng = random.Random(seed)
    eval_rows, seen = [], set()
    while len(eval_rows) < num_eval:
        row = make_example(rng, config)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            eval_rows.append(row)
    train_rows = []
    while len(train_rows) < num_train:
        row = make_example(rng, config)
        if row["prompt"] not in seen:
            train_rows.append(row)
    return DatasetDict(
        train=Dataset.from_list(train_rows),
        eval=Dataset.from_list(eval_rows),
    )


def extract_answer(text: str) -> str | None:
    """The stripped text after the last marker, or None when the marker is absent (the rule of
    `adaswitch.evaluate`'s default checker, so both report the same accuracy)."""
    return evaluate_extract_answer(text, ANSWER_MARKER)


def is_correct(generated: str, answer: str) -> bool:
    return extract_answer(generated) == answer


_STEP = re.compile(r"^(\d+)([+*-])(\d+)=(\d+)$")
_PROMPT = re.compile(r"^(\d+(?:[+*-]\d+)*)=$")


def parse_prompt(prompt: str) -> tuple[list[int], list[str]]:
    """"7+8*3-5=" -> ([7, 8, 3, 5], ["+", "*", "-"])."""
    if not _PROMPT.match(prompt.strip()):
        raise ValueError(f"not a task prompt: {prompt!r}")
    tokens = re.findall(r"\d+|[+*-]", prompt)
    return [int(t) for t in tokens[::2]], tokens[1::2]


def step_checks(prompt: str, generated: str) -> list[bool]:
    """Per-step grading of a worked answer, each step judged given the model's own earlier results.

    The task fixes the order of the steps (products first, then left to right), so step j must combine
    the two values that are adjacent at that point, where the values are the prompt's operands with every
    earlier step's pair replaced by the result *the model wrote* (right or wrong). Step j is correct when
    the model wrote exactly `a op b = c` with those a, op, b and c = a op b. A missing or malformed step is
    wrong (and the correct value of it stands in for later steps). One entry per expected step."""
    operands, ops = parse_prompt(prompt)
    body = generated.split(ANSWER_MARKER, 1)[0]
    written = [_STEP.match(part.strip()) for part in body.split(STEP_SEPARATOR)] if body.strip() else []
    values, pending, checks = list(operands), list(ops), []
    for phase in ("*", "+-"):
        i = 0
        while i < len(pending):
            if pending[i] not in phase:
                i += 1
                continue
            a, b, op = values[i], values[i + 1], pending[i]
            want = a * b if op == "*" else a + b if op == "+" else a - b
            m = written[len(checks)] if len(checks) < len(written) else None
            ok = m is not None and (int(m[1]), m[2], int(m[3]), int(m[4])) == (a, op, b, want)
            checks.append(ok)
            values[i : i + 2] = [int(m[4]) if m is not None else want]  # the model's own result carries on
            del pending[i]
    return checks


def step_checker(prompt: str, generated: str, reference: str) -> list[bool]:
    """`adaswitch.evaluate`'s step_checker hook for this task (the reference is not needed)."""
    return step_checks(prompt, generated)
