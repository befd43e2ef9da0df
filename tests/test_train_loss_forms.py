"""Distiller with the loss forms of docs/spec.md section 5: a step's loss and gradients against the float64
reference loss on the step's own sequences (the hard-label term on the teacher-written tokens, the
sampled-token form with the teacher-written tokens' importance weights, sequence_mean), the fused and the
logits paths agreeing, and the config's one-line errors."""

import pytest
import torch
from tiny_models import fused_and_logits_steps
from tiny_models import tiny_distiller as make_trainer

from adaswitch import DistillConfig
from adaswitch.ops.loss import reference_distill_loss

IGNORE = -100


def _step(trainer):
    """One compute_loss with its sequences captured: (loss, batch, responses)."""
    seen = {}
    real = trainer._responses

    def spy(model, inputs):
        seen["out"] = real(model, inputs)
        return seen["out"]

    trainer._responses = spy
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    return loss, batch, seen["out"]


def _reference(trainer, batch, responses):
    """The loss the config asks for, on the step's sequences, from float64 logits of both models."""
    resp, valid, from_student, from_teacher, _ = responses
    args = trainer.args
    prompt, pmask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    width, n = prompt.shape[1], resp.shape[1]
    ids = torch.cat([prompt, resp], 1)
    mask = torch.cat([pmask, valid.long()], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    v = trainer.vocab_size
    with torch.no_grad():
        t = trainer.teacher_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    s = trainer.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    s, t = (x[:, width - 1 : width - 1 + n, :v].double() for x in (s, t))
    keep = {"all": valid, "student": from_student, "teacher": from_teacher}[args.token_mask]
    labels = torch.where(keep, resp, IGNORE)
    hard = None
    if args.hard_label_mask != "all":
        hard = torch.where({"student": from_student, "teacher": from_teacher}[args.hard_label_mask], resp, IGNORE)
    kw = dict(weight_hard_loss=args.weight_hard_loss, weight_soft_loss=args.weight_soft_loss, hard_labels=hard)
    if args.loss_kind == "sampled_reverse_kl":
        kw.update(discount=args.sampled_discount, importance_cap=args.sampled_importance_cap,
                  teacher_sampled=from_teacher)
    loss = reference_distill_loss(s, t, args.loss_kind, beta=args.beta, alpha=args.alpha,
                                  temperature=args.loss_temperature, labels=labels,
                                  reduction=args.loss_reduction, **kw)
    return loss, s


SWITCH = dict(window=1, k=1e-3)  # most rows switch early: both models write tokens


@pytest.mark.parametrize(
    "settings",
    [
        dict(policy="adaswitch", weight_hard_loss=0.5, hard_label_mask="teacher", **SWITCH),
        dict(policy="adaswitch", weight_hard_loss=0.3, weight_soft_loss=0.7, loss_kind="jsd", **SWITCH),
        dict(policy="student", loss_kind="sampled_reverse_kl"),
        dict(policy="skd", loss_kind="sampled_reverse_kl", sampled_discount=0.9, skd_top_k=40),
        dict(policy="adaswitch", loss_kind="sampled_reverse_kl", weight_hard_loss=0.2, hard_label_mask="teacher",
             loss_reduction="sequence_mean", **SWITCH),
        dict(policy="teacher", loss_reduction="sequence_mean"),
    ],
    ids=["adaswitch-hard-teacher", "jsd-hard-all", "sampled-on-policy", "sampled-skd-discount",
         "sampled-adaswitch-hard-seq", "seqkd-sequence-mean"],
)
def test_step_loss_and_gradients_match_the_reference(tmp_path, settings):
    trainer = make_trainer(tmp_path, **settings)
    loss, batch, responses = _step(trainer)
    _, valid, _, from_teacher, _ = responses
    if settings.get("hard_label_mask") == "teacher" or settings["policy"] == "skd":
        assert from_teacher.any() and (valid & ~from_teacher).any()  # both kinds of tokens occur
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, params)
    trainer.model.zero_grad()
    ref, _ = _reference(trainer, batch, responses)
    theirs = torch.autograd.grad(ref, params)
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-4, abs=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("settings", [
    dict(policy="adaswitch", loss_kind="sampled_reverse_kl", weight_hard_loss=0.5, **SWITCH),
    dict(policy="adaswitch", weight_hard_loss=0.5, hard_label_mask="teacher", loss_reduction="sequence_mean",
         **SWITCH),
])
def test_fused_and_logits_paths_agree(tmp_path, settings):
    trainer = make_trainer(tmp_path, **settings)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert trainer._use_fused(trainer.model)
    results = fused_and_logits_steps(trainer, batch)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(loss_kind="sampled"), "loss_kind must be one of"),
        (dict(loss_reduction="batchmean"), "loss_reduction must be one of ('mean', 'sequence_mean')"),
        (dict(weight_hard_loss=-0.1), "weight_hard_loss must be a finite number >= 0"),
        (dict(weight_soft_loss=0.0), "both 0"),
        (dict(hard_label_mask="teacher"), "set weight_hard_loss > 0"),
        (dict(weight_hard_loss=0.5, hard_label_mask="everything"), "hard_label_mask must be one of"),
        (dict(sampled_discount=0.5), "apply to loss_kind='sampled_reverse_kl'"),
        (dict(loss_kind="sampled_reverse_kl", sampled_discount=2.0), "sampled_discount must be a number in [0, 1]"),
        (dict(loss_kind="sampled_reverse_kl", sampled_importance_cap=0), "sampled_importance_cap must be"),
        (dict(loss_kind="sampled_reverse_kl", policy="dataset"), "policy 'dataset' tokens come from neither"),
    ],
)
def test_config_errors_are_one_line(tmp_path, settings, message):
    with pytest.raises(ValueError) as err:
        DistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_older_than_the_loss_fields_resumes_with_their_defaults(tmp_path):
    """A run_settings.json written before the loss-form fields existed matches a run that leaves them at their
    defaults (the loss of that version), and differs from one that sets them."""
    from adaswitch.train.resume import _differences, run_settings

    new = ("loss_reduction", "weight_hard_loss", "weight_soft_loss", "hard_label_mask", "sampled_discount",
           "sampled_importance_cap")
    args = DistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    old = {k: v for k, v in run_settings(args).items() if k not in new}
    assert _differences(old, run_settings(args)) == []
    changed = DistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", weight_hard_loss=0.5)
    assert _differences(old, run_settings(changed)) == ["weight_hard_loss unset (this run: 0.5)"]
