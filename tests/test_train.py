"""Distiller: the loss of a step against a float64 hand computation, fused vs logits paths, token masks,
num_items_in_batch, metrics, a frozen teacher, atomic checkpoints and bad inputs."""

import math
import os

import datasets
import pytest
import torch
from scripts.tiny_run import rows
from tiny_models import fused_and_logits_steps, tiny_student, tiny_teacher, tiny_tokenizer
from tiny_models import tiny_distiller as make_trainer

from adaswitch import Distiller


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def test_dataset_policy_loss_matches_float64_reference(tmp_path):
    trainer = make_trainer(tmp_path, policy="dataset", loss_kind="jsd", beta=0.3, loss_temperature=0.05)
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    tok = trainer.processing_class
    total, count = 0.0, 0
    for key in batch["example_keys"].tolist():
        row = rows(4)[key]
        p = tok(row["prompt"])["input_ids"]
        c = (tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:5]  # budget
        ids = torch.tensor([p + c])
        with torch.no_grad():
            s = trainer.model(ids).logits[0, len(p) - 1 : -1].double() / 0.05
            t = trainer.teacher_model(ids).logits[0, len(p) - 1 : -1].double() / 0.05
        ps, pt = s.softmax(-1), t.softmax(-1)
        m = 0.3 * pt + 0.7 * ps
        kl = lambda a, b: (a * (a.log() - b.log())).sum(-1)  # noqa: E731
        total += float((0.3 * kl(pt, m) + 0.7 * kl(ps, m)).sum())
        count += len(c)
    assert float(loss.detach()) == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("policy", ["adaswitch", "skd", "dataset"])
def test_fused_and_logits_paths_agree(tmp_path, policy):
    switching = dict(window=1, k=1e-3) if policy == "adaswitch" else {}  # other policies refuse them
    trainer = make_trainer(tmp_path, policy=policy, **switching)
    batch = first_batch(trainer)
    assert trainer._use_fused(trainer.model)
    grads = fused_and_logits_steps(trainer, batch)
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_token_masks_partition_the_response(tmp_path):
    counts = {}
    for mask in ("all", "student", "teacher"):
        # window 1, tiny k: most rows switch early, so both masks cover some tokens
        trainer = make_trainer(tmp_path, policy="adaswitch", window=1, k=1e-3, token_mask=mask)
        trainer.compute_loss(trainer.model, first_batch(trainer))
        counts[mask] = trainer._metrics["train"]["loss_tokens"][-1]
        assert trainer._metrics["train"]["switch_rate"][-1] > 0
    assert counts["student"] > 0 and counts["teacher"] > 0
    assert counts["student"] + counts["teacher"] == counts["all"]


def test_num_items_in_batch_replaces_the_count(tmp_path):
    trainer = make_trainer(tmp_path, policy="dataset")
    batch = first_batch(trainer)
    mean = trainer.compute_loss(trainer.model, batch)
    n = trainer._metrics["train"]["loss_tokens"][-1]
    scaled = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(100.0))
    assert float(scaled.detach()) == pytest.approx(float(mean.detach()) * n / 100, rel=1e-6)
    assert trainer.loss_is_scaled_for_ga is True


def test_training_logs_metrics_and_keeps_the_teacher_frozen(tmp_path):
    teacher = tiny_teacher(max_positions=64)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = tiny_student(max_positions=64).train()
    start = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = make_trainer(tmp_path, student=student, teacher=teacher, policy="adaswitch", window=1, k=1e-3)
    trainer.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in (
        "loss",
        "switch_rate",
        "mean_switch_position",
        "teacher_token_fraction",
        "mean_exploration_divergence",
        "generation_seconds",
        "train_seconds",
        "tokens_per_second",
    ):
        assert all(math.isfinite(h[key]) for h in logs), key
    assert all(0 < h["switch_rate"] <= 1 and 0 < h["teacher_token_fraction"] <= 1 for h in logs)


def test_checkpoints_are_renamed_into_place(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, policy="dataset", max_steps=3, save_strategy="steps", save_steps=1)
    calls = []
    original = Distiller._save_rng_state

    def crash_on_third(self, output_dir):
        calls.append(output_dir)
        assert os.path.basename(os.path.dirname(output_dir)).startswith(
            ".staging-"
        )  # written under a temp name
        if len(calls) == 3:
            raise OSError("disk full")
        original(self, output_dir)

    monkeypatch.setattr(Distiller, "_save_rng_state", crash_on_third)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = tmp_path / "out"
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-1", "checkpoint-2"]  # the partial one never got the final name, and was removed
    for name in ("checkpoint-1", "checkpoint-2"):
        assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state.pth"} <= set(
            os.listdir(out / name)
        )
    from transformers.trainer_utils import get_last_checkpoint

    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="DistillConfig"):
        Distiller(
            model=tiny_student(),
            teacher_model=tiny_teacher(),
            args=None,
            train_dataset=None,
            processing_class=tiny_tokenizer(),
        )
    with pytest.raises(ValueError, match=r"fsdp_config\['version'\] must be 2"):
        make_trainer(tmp_path, fsdp=True, fsdp_config={"version": 1})
    tok = tiny_tokenizer()
    tok.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        make_trainer(tmp_path, tokenizer=tok)
    with pytest.raises(ValueError, match="tokenizer has 300 tokens but the student has 200"):
        make_trainer(tmp_path, student=tiny_student(vocab_size=200, max_positions=64))
    no_completion = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows(4)])
    with pytest.raises(ValueError, match=r"train dataset: missing column\(s\) \['completion'\]"):
        make_trainer(tmp_path, data=no_completion, policy="mixed")
    make_trainer(tmp_path, data=no_completion, policy="student")  # on-policy needs no completions
    long_prompt = datasets.Dataset.from_list(rows(3) + [{"prompt": "the cat " * 40, "completion": "a"}])
    with pytest.raises(
        ValueError, match="train dataset: row 3 has a prompt of 80 tokens, longer than the limit of 59"
    ):
        make_trainer(tmp_path, data=long_prompt)


def test_teacher_with_padded_vocabulary(tmp_path):
    trainer = make_trainer(tmp_path, teacher=tiny_teacher(vocab_size=320, max_positions=64), policy="skd")
    loss = trainer.compute_loss(trainer.model, first_batch(trainer))
    assert trainer.vocab_size == 300 and math.isfinite(float(loss.detach()))


def test_best_checkpoint_tracking_survives_the_rename(tmp_path):
    import json

    data = datasets.Dataset.from_list(rows(4))
    trainer = make_trainer(
        tmp_path,
        data=data,
        eval_data=data,
        policy="dataset",
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        metric_for_best_model="loss",
        load_best_model_at_end=True,
        save_total_limit=1,
    )
    trainer.train()
    out = tmp_path / "out"
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(out) and os.path.isdir(best)
    last = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert last["best_model_checkpoint"] == best
    assert not any(n.startswith(".staging") for n in os.listdir(out))


def test_lookahead_trains_on_the_same_tokens(tmp_path):
    losses = []
    for lookahead in (0, 3):
        # guidance="step": lookahead alone gives step mode's tokens (speculative guidance, the default
        # with a lookahead, keeps the teacher's distribution with other draws)
        trainer = make_trainer(tmp_path, policy="adaswitch", window=1, k=1e-3, lookahead=lookahead,
                               guidance="step")
        losses.append(trainer.compute_loss(trainer.model, first_batch(trainer)).detach())
        assert trainer._metrics["train"]["teacher_token_fraction"][-1] > 0
    # the loss reuses the teacher's states from generation: a 3-position forward's rounding, not a 1-position one
    assert torch.allclose(losses[0], losses[1], rtol=1e-5), (losses, (losses[0] - losses[1]).abs() / losses[1])
