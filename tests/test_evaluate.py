"""adaswitch.evaluate: answer checking, accuracy, the teacher-forced KL and the JSON results."""

import json

import datasets
import pytest
import torch
from tiny_models import tiny_student, tiny_teacher, tiny_tokenizer

import adaswitch
from adaswitch.train.evaluate import exact_match_checker, extract_answer


@pytest.fixture(scope="module")
def setup():
    data = datasets.Dataset.from_list(
        [
            {"prompt": "what is two plus two", "completion": "two plus two equals four answer 4"},
            {"prompt": "the cat sat on", "completion": "the moon answer 7"},
            {"prompt": "one plus one is", "completion": "two"},
        ]
    )
    return tiny_student(max_positions=64), tiny_teacher(max_positions=64), tiny_tokenizer(), data


def test_extract_and_check():
    assert extract_answer("so x = 3 #### 42 ", "####") == "42"
    assert extract_answer("a #### 1 #### 2") == "2"
    assert extract_answer("no marker") is None
    check = exact_match_checker("####")
    assert check("work #### 5", "reasoning #### 5") and not check("work #### 6", "#### 5")
    assert check("#### 5", "5") and not check("5", "5")  # a prediction needs the marker


def test_accuracy_with_a_checker_and_json(setup, tmp_path):
    model, _, tok, data = setup
    seen = []

    def checker(prediction, reference):
        seen.append((prediction, reference))
        return reference.endswith("4")

    out = tmp_path / "res" / "eval.json"
    res = adaswitch.evaluate(
        model, tok, data, checker=checker, max_new_tokens=3, batch_size=2, output_path=out, progress=False
    )
    assert res["num_examples"] == 3 and res["correct"] == 1 and res["accuracy"] == pytest.approx(1 / 3)
    assert [r for _, r in seen][0].startswith("two plus two equals four answer")
    assert json.loads(out.read_text())["accuracy"] == res["accuracy"]
    assert [e["index"] for e in res["examples"]] == [0, 1, 2]


def test_step_checker_hook(setup):
    """step_accuracy = right steps / expected steps over all examples; the hook sees each row's own prompt,
    the prediction and the reference."""
    model, _, tok, data = setup
    seen = []

    def step_checker(prompt, prediction, reference):
        seen.append((prompt, prediction, reference))
        return {"what is two plus two": [True, False, True], "the cat sat on": [False], "one plus one is": []}[prompt]

    res = adaswitch.evaluate(model, tok, data, step_checker=step_checker, max_new_tokens=3, batch_size=2,
                             progress=False)
    assert [p for p, _, _ in seen] == list(data["prompt"])
    assert [e["prediction"] for e in res["examples"]] == [pred for _, pred, _ in seen]
    assert res["step_accuracy"] == pytest.approx(2 / 4) and res["steps_total"] == 4
    assert [(e["steps_correct"], e["steps_total"]) for e in res["examples"]] == [(2, 3), (0, 1), (0, 0)]
    assert "step_accuracy" not in adaswitch.evaluate(model, tok, data, max_new_tokens=1, progress=False)


def test_demo_task_step_checks():
    from adaswitch.demo.task import build_dataset, step_checks

    p = "7+8*3-5="
    assert step_checks(p, "8*3=24;7+24=31;31-5=26####26") == [True, True, True]
    # a wrong product, then right arithmetic on the model's own result: only the first step is wrong
    assert step_checks(p, "8*3=25;7+25=32;32-5=27####27") == [False, True, True]
    assert step_checks(p, "8*3=25;7+24=31;31-5=26####26") == [False, False, True]  # ignored its own result
    assert step_checks(p, "7+8=15;15*3=45") == [False, False, False]  # wrong order
    assert step_checks(p, "8*3=24;7+24=31") == [True, True, False]  # a missing step
    assert step_checks(p, "") == [False] * 3
    for row in build_dataset(200, 50, seed=1)["eval"]:
        assert step_checks(row["prompt"], row["completion"]) == [True] * row["num_steps"]


def test_predictions_are_greedy_generate(setup):
    model, _, tok, data = setup
    res = adaswitch.evaluate(model, tok, data.select([0]), max_new_tokens=4, progress=False)
    ids = tok("what is two plus two", return_tensors="pt")
    ref = model.generate(**ids, do_sample=False, max_new_tokens=4, pad_token_id=0, eos_token_id=2)
    assert res["examples"][0]["prediction"] == tok.decode(
        ref[0, ids["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_teacher_forced_kl(setup):
    model, teacher, tok, data = setup
    same = adaswitch.evaluate(model, tok, data, teacher=model, max_new_tokens=2, progress=False)
    assert same["teacher_kl"] == pytest.approx(0.0, abs=1e-6)
    res = adaswitch.evaluate(model, tok, data, teacher=teacher, max_new_tokens=2, progress=False)
    # By hand: mean over all reference tokens (EOS included) of KL(p_T || p_S).
    total, count = 0.0, 0
    for row in data:
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            ls = model(ids).logits[0, len(p) - 1 : -1].double().log_softmax(-1)
            lt = teacher(ids).logits[0, len(p) - 1 : -1].double().log_softmax(-1)
        total += float((lt.exp() * (lt - ls)).sum())
        count += len(c)
    assert res["teacher_kl"] == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"answer_marker": ""}, "answer_marker"),
        ({"checker": 3}, "checker"),
        ({"step_checker": "steps"}, "step_checker"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments(setup, kw, match):
    model, _, tok, data = setup
    with pytest.raises((ValueError, TypeError), match=match):
        adaswitch.evaluate(model, tok, data, **kw)


def test_bad_rows_name_the_row(setup):
    model, _, tok, data = setup
    bad = datasets.Dataset.from_list(data.to_list() + [{"prompt": "", "completion": "x"}])
    with pytest.raises(ValueError, match="row 3 has an empty prompt"):
        adaswitch.evaluate(model, tok, bad, max_new_tokens=8, progress=False)


def test_default_budget_fits_the_context(setup):
    model, _, tok, data = setup  # context 64: 256 new tokens would not fit
    res = adaswitch.evaluate(model, tok, data.select([1]), progress=False)
    prompt = len(tok("the cat sat on")["input_ids"])
    assert 0 < len(tok(res["examples"][0]["prediction"])["input_ids"]) <= 64 - prompt
