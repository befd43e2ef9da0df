"""`torch.nn.Module` wrappers of the losses: configuration in the constructor, tensors in `forward`
(drop-in for Liger's LigerJSD / LigerFusedLinearJSD style code)."""

from __future__ import annotations

import torch

from adaswitch._validation import check_loss_args, check_loss_weights, check_sampled_args
from adaswitch.ops.fused_linear import check_head_processing, fused_linear_distill_loss
from adaswitch.ops.loss import check_reduction, distill_loss
from adaswitch.ops.sampled import DEFAULT_IMPORTANCE_CAP


class _LossConfig(torch.nn.Module):
    def __init__(self, kind, beta, alpha, temperature, ignore_index, reduction, impl, weight_hard_loss=0.0,
                 weight_soft_loss=1.0, discount=0.0, importance_cap=DEFAULT_IMPORTANCE_CAP):
        super().__init__()
        check_loss_args(kind, beta, alpha, temperature)
        check_reduction(reduction)
        check_loss_weights(weight_hard_loss, weight_soft_loss)
        check_sampled_args(discount, importance_cap)
        self.kind, self.beta, self.alpha, self.temperature = kind, beta, alpha, temperature
        self.ignore_index, self.reduction, self.impl = ignore_index, reduction, impl
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.discount, self.importance_cap = discount, importance_cap

    def _kwargs(self):
        return {
            "beta": self.beta,
            "alpha": self.alpha,
            "temperature": self.temperature,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
            "weight_hard_loss": self.weight_hard_loss,
            "weight_soft_loss": self.weight_soft_loss,
            "discount": self.discount,
            "importance_cap": self.importance_cap,
            "impl": self.impl,
        }

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, beta={self.beta}, alpha={self.alpha}, temperature={self.temperature}, "
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}"
        )


class DistillLoss(_LossConfig):
    """`distill_loss` as a module: `DistillLoss("jsd", beta=0.5)(student_logits, teacher_logits, labels)`."""

    def __init__(
        self,
        kind="forward_kl",
        *,
        beta=0.5,
        alpha=0.1,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        discount=0.0,
        importance_cap=DEFAULT_IMPORTANCE_CAP,
        impl=None,
    ):
        super().__init__(kind, beta, alpha, temperature, ignore_index, reduction, impl, weight_hard_loss,
                         weight_soft_loss, discount, importance_cap)

    def forward(self, student_logits, teacher_logits, labels=None, num_items_in_batch=None, hard_labels=None,
                teacher_sampled=None):
        return distill_loss(
            student_logits,
            teacher_logits,
            self.kind,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            hard_labels=hard_labels,
            teacher_sampled=teacher_sampled,
            **self._kwargs(),
        )


class FusedLinearDistillLoss(_LossConfig):
    """`fused_linear_distill_loss` as a module; forward takes (student_hidden, student_weight,
    teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, num_items_in_batch), the
    argument order of Liger's LigerFusedLinearJSD plus the optional biases. The models' logit scales and
    softcaps are configuration, given to the constructor."""

    def __init__(
        self,
        kind="forward_kl",
        *,
        beta=0.5,
        alpha=0.1,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        weight_hard_loss=0.0,
        weight_soft_loss=1.0,
        discount=0.0,
        importance_cap=DEFAULT_IMPORTANCE_CAP,
        chunk_size=None,
        impl=None,
        student_logit_scale=1.0,
        teacher_logit_scale=1.0,
        student_softcap=None,
        teacher_softcap=None,
    ):
        super().__init__(kind, beta, alpha, temperature, ignore_index, reduction, impl, weight_hard_loss,
                         weight_soft_loss, discount, importance_cap)
        self.student_logit_scale, self.student_softcap = check_head_processing(
            "student", student_logit_scale, student_softcap
        )
        self.teacher_logit_scale, self.teacher_softcap = check_head_processing(
            "teacher", teacher_logit_scale, teacher_softcap
        )
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def forward(
        self,
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        labels=None,
        student_bias=None,
        teacher_bias=None,
        num_items_in_batch=None,
        hard_labels=None,
        teacher_sampled=None,
    ):
        return fused_linear_distill_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            self.kind,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            student_logit_scale=self.student_logit_scale,
            teacher_logit_scale=self.teacher_logit_scale,
            student_softcap=self.student_softcap,
            teacher_softcap=self.teacher_softcap,
            labels=labels,
            num_items_in_batch=num_items_in_batch,
            hard_labels=hard_labels,
            teacher_sampled=teacher_sampled,
            chunk_size=self.chunk_size,
            **self._kwargs(),
        )
