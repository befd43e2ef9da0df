"""The demo's experiment on the real pair (`adaswitch.demo.build_real`): the same runs as the arithmetic
demo (`adaswitch.demo.experiment.run_method`), measured the way a chat model is.

Per model, on the eval split (held out of the student's healing and of every method's prompts):

* `teacher_kl`: teacher-forced KL(p_T || p_S) per token of the teacher's own greedy answers;
* `teacher_nll`: the teacher's NLL (nats per token) of the model's own greedy answers: how much the
  teacher agrees with what the model writes alone, the on-policy quality;
* `accuracy`: right answers on the checkable prompts (`real_task.check_answer`, against the truth);
* `samples`: a few prompts with the model's answers.
"""

from __future__ import annotations

import math
from pathlib import Path

NUM_SAMPLES = 6  # answers kept per run: the first open and checkable eval prompts


def real_measure(ctx, model, *, max_new_tokens: int, with_kl: bool = False) -> dict:
    """`Context.measure` of the real task (greedy answers of `model` on the eval split)."""
    from adaswitch.demo.real_task import check_answer
    from adaswitch.train.evaluate import evaluate

    out = evaluate(
        model,
        ctx.tokenizer,
        ctx.eval.select_columns(["prompt", "completion"]),
        checker=lambda prediction, reference: False,  # the checkable answers are scored below, against the truth
        teacher=ctx.teacher if with_kl else None,
        teacher_nll=with_kl,
        max_new_tokens=max_new_tokens,
        batch_size=32,
        progress=False,
    )
    kinds, answers = ctx.eval["kind"], ctx.eval["answer"]
    checked = [check_answer(kinds[e["index"]], answers[e["index"]], e["prediction"])
               for e in out["examples"] if kinds[e["index"]] != "open"]
    samples = sample_indices(kinds)
    return {
        "accuracy": sum(checked) / len(checked) if checked else math.nan,
        "step_accuracy": math.nan,
        "teacher_kl": out.get("teacher_kl", math.nan),
        "teacher_nll": out.get("teacher_nll", math.nan),
        "samples": [{"prompt": ctx.eval[i]["prompt"][-1]["content"], "answer": out["examples"][i]["prediction"],
                     "reference": ctx.eval[i]["completion"]} for i in samples],
    }


def sample_indices(kinds: list[str], n: int = NUM_SAMPLES) -> list[int]:
    """The first n // 2 open and n - n // 2 checkable eval rows (the same rows for every run)."""
    open_rows = [i for i, k in enumerate(kinds) if k == "open"][: n // 2]
    checkable = [i for i, k in enumerate(kinds) if k != "open"][: n - n // 2]
    return sorted(open_rows + checkable)


def prepare_real(*, cache_dir: str | Path | None = None, num_eval: int | None = None, max_new_tokens: int = 32,
                 progress: bool = True, measure: bool = True):
    """The real pair's Context (built first where missing): teacher, healed student, train / eval splits."""
    from adaswitch.demo.build_real import ensure_pair, load_model, read_split
    from adaswitch.demo.experiment import Context

    pair = ensure_pair(cache_dir, progress=progress)
    teacher, tokenizer = load_model(pair.teacher)
    teacher.requires_grad_(False)
    student, student_tokenizer = load_model(pair.student)
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the student at {str(pair.student)!r} does not share the teacher's tokenizer")
    train, eval_split = read_split(pair.data, "train"), read_split(pair.data, "eval")
    if num_eval is not None:
        if not isinstance(num_eval, int) or not 1 <= num_eval <= len(eval_split):
            raise ValueError(f"num_eval must be an int in [1, {len(eval_split)}], got {num_eval!r}")
        eval_split = eval_split.select(range(num_eval))
    ctx = Context(tokenizer=tokenizer, teacher=teacher, student=student, train=train, eval=eval_split,
                  teacher_accuracy=math.nan, student_accuracy=math.nan, sft_seconds=0.0, measure=real_measure)
    if measure:
        own = ctx.evaluate(teacher, max_new_tokens=max_new_tokens, with_kl=True)
        ctx.teacher_accuracy = own["accuracy"]
        ctx.info["teacher_own_nll"] = own["teacher_nll"]  # the teacher's NLL of its own greedy answers: the floor
        start = ctx.evaluate(student, max_new_tokens=max_new_tokens, with_kl=True)
        ctx.student_accuracy, ctx.student_teacher_kl = start["accuracy"], start["teacher_kl"]
        ctx.student_teacher_nll = start["teacher_nll"]
        ctx.info["start_samples"] = start["samples"]
    kinds = eval_split["kind"]
    ctx.info.update({
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_architecture": type(teacher).__name__,
        "student_architecture": type(student).__name__,
        "student_source": f"{pair.student} (pruned + healed, build_info.json)",
        "sft_seconds_at_start": 0.0,
        "num_train": len(train),
        "num_eval": len(eval_split),
        "num_eval_checkable": sum(k != "open" for k in kinds),
        "pair": {part: str(getattr(pair, part)) for part in ("teacher", "student", "data")},
    })
    return ctx
