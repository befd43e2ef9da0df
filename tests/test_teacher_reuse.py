"""Distiller feeds the loss the teacher's hidden states from generation (reuse_teacher_states) instead of a
second teacher forward: the same loss and gradients, for every policy that runs the teacher, in step mode,
lookahead and speculative guidance, under gradient accumulation, and for model families whose logits are
processed (logit scale, softcap, head bias). Policies without teacher states keep the second forward."""

import datasets
import pytest
import torch
from test_loss_model_heads import FAMILIES, family_model
from test_train import rows
from tiny_models import tiny_student, tiny_teacher, tiny_tokenizer

from adaswitch import DistillConfig, Distiller

pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(tmp_path, student=None, teacher=None, n_rows=4, **kw):
    settings = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
                    max_new_tokens=6, max_steps=1, save_strategy="no", logging_steps=1, disable_tqdm=True,
                    learning_rate=1e-2, seed=3)
    settings.update(kw)
    return Distiller(model=(student or tiny_student(max_positions=64)).train(),
                     teacher_model=teacher or tiny_teacher(max_positions=64), args=DistillConfig(**settings),
                     train_dataset=datasets.Dataset.from_list(rows(n_rows)), processing_class=tiny_tokenizer())


def first_batch(trainer):
    trainer.current_gradient_accumulation_steps = 1
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def teacher_loss_forwards(trainer):
    """Counts the loss's teacher forwards (Distiller._forward on the teacher)."""
    calls = []
    forward = trainer._forward

    def counting(model, *args, **kw):
        calls.append(model is trainer.teacher_model)
        return forward(model, *args, **kw)

    trainer._forward = counting
    return calls


def loss_and_grads(trainer, batch, reuse):
    trainer.args.reuse_teacher_states = reuse
    calls = teacher_loss_forwards(trainer)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    del trainer._forward
    reused = trainer._metrics["train"]["teacher_states_reused"][-1]
    return loss.detach(), [p.grad.clone() for p in trainer.model.parameters()], sum(calls), reused


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    for x, y in zip(a[1], b[1]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


CASES = [
    ("adaswitch", dict(window=1, k=1e-3, lookahead=0)),
    ("adaswitch", dict(window=1, k=1e-3, lookahead=3, guidance="step")),
    ("adaswitch", dict(window=1, k=1e-3, lookahead=3, guidance="speculative")),
    ("adaswitch", dict(window=2, k=1.5)),  # the defaults: step mode, reuse on
    ("fixed_switch", dict(switch_position=2)),
    ("random_switch", dict(switch_positions=[1, 3, -1])),
    ("skd", dict(skd_top_k=3, lookahead=0)),
    ("skd", dict(skd_top_k=3, lookahead=4)),
    ("teacher", dict(lookahead=0)),
    ("teacher", dict(lookahead=2, guidance="speculative", teacher_temperature=0.7, teacher_top_k=20)),
]


@pytest.mark.parametrize("policy,kw", CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(CASES)])
def test_reused_states_give_the_second_forward_loss(tmp_path, policy, kw):
    trainer = make_trainer(tmp_path, policy=policy, **kw)
    batch = first_batch(trainer)
    second = loss_and_grads(trainer, batch, reuse=False)
    reused = loss_and_grads(trainer, batch, reuse=True)
    assert second[2] == 1 and second[3] == 0.0
    assert reused[2] == 0 and reused[3] == 1.0  # no teacher forward in the loss
    assert_same(second, reused)


@pytest.mark.parametrize("policy,kw", [("student", {}), ("mixed", {"lmbda": 0.5}), ("dataset", {})])
def test_policies_without_teacher_states_keep_the_second_forward(tmp_path, policy, kw):
    trainer = make_trainer(tmp_path, policy=policy, **kw)
    batch = first_batch(trainer)
    out = loss_and_grads(trainer, batch, reuse=True)
    assert out[2] == 1 and out[3] == 0.0


def test_partial_coverage_falls_back(tmp_path):
    """A loss position the teacher did not run on (here: marked so) takes the second forward."""
    trainer = make_trainer(tmp_path, policy="teacher", lookahead=0)
    batch = first_batch(trainer)
    responses = trainer._responses

    def holed(model, inputs):
        out = responses(model, inputs)
        out[4].teacher_states_mask[0, 0] = False
        return out

    trainer._responses = holed
    out = loss_and_grads(trainer, batch, reuse=True)
    assert out[2] == 1 and out[3] == 0.0


def test_gradient_accumulation(tmp_path):
    """Two micro-batches accumulated: the same update with reused states as with the second forward."""
    weights, losses = [], []
    for reuse in (False, True):
        trainer = make_trainer(tmp_path / str(reuse), student=tiny_student(max_positions=64), n_rows=8,
                               policy="adaswitch", window=1, k=1e-3, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, max_steps=2, reuse_teacher_states=reuse,
                               optim="sgd", learning_rate=0.5)  # (Adam would amplify rounding in ~0 grads)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert all(h["teacher_states_reused"] == float(reuse) for h in logs)
        losses.append([h["loss"] for h in logs])
        weights.append([p.detach().clone() for p in trainer.model.parameters()])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for a, b in zip(*weights):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["cohere", "granite", "gemma2", "phi"])
def test_processed_logits_families(tmp_path, family):
    """Families whose forward scales / softcaps the logits or adds a head bias: the reused states go through
    the same checked processing as the second forward's."""
    trainer = make_trainer(tmp_path, family_model(family, 1), family_model(family, 2), policy="teacher",
                           lookahead=0, max_new_tokens=5, loss_kind="jsd", beta=0.3, loss_temperature=1.5)
    assert trainer._fused_heads["teacher"] == FAMILIES[family][3]
    batch = first_batch(trainer)
    second = loss_and_grads(trainer, batch, reuse=False)
    reused = loss_and_grads(trainer, batch, reuse=True)
    assert reused[2] == 0 and reused[3] == 1.0
    assert_same(second, reused)


def test_config_guidance_checks(tmp_path):
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    default = DistillConfig(**base)
    assert default.reuse_teacher_states is True and (default.lookahead, default.guidance) == ("auto", "auto")
    with pytest.raises(ValueError, match="guidance must be one of"):
        DistillConfig(**base, guidance="fast")
    with pytest.raises(ValueError, match="set lookahead >= 1"):
        DistillConfig(**base, guidance="speculative", lookahead=0)
    with pytest.raises(ValueError, match="applies to policies"):
        DistillConfig(**base, policy="skd", lookahead=2, guidance="speculative")
    assert DistillConfig(**base, policy="teacher", lookahead=2, guidance="speculative").lookahead == 2
    with pytest.raises(ValueError, match="lookahead applies"):
        DistillConfig(**base, policy="teacher", lookahead=2)
