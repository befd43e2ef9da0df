"""`distill_loss`: the training loss of docs/spec.md section 5, differentiable w.r.t. the student logits.

The forward pass computes each row's loss *and* the analytic gradient w.r.t. the student logits in one
go (the Triton kernel in kernels/triton/loss.py, the native CPU op in kernels/csrc/loss.cpp, or a
chunked PyTorch version of the same formulas), so the autograd backward only multiplies the saved
gradient by `grad_output`. Nothing reads a device value on the host: the valid-token count, the mean's
divisor and `grad_output` stay tensors, so the op never syncs and can be captured in a CUDA graph.

Gradients, with s = z_S / T, p = softmax, h_j = dL/dlog p_S,j (log p_S treated as free) and
c = sum_j p_S,j h_j:  dL/dz_S = (1/T) * p_S * (h - c).  Per kind:
  forward_kl       dL/ds = p_S - p_T                                  (h = -p_T / p_S, c = -1)
  reverse_kl       h = log p_S - log p_T                               (c = the loss)
  jsd              h = (1 - beta)(log p_S - log m),  m = beta p_T + (1 - beta) p_S
  tvd              h = sign(p_S - p_T) / 2
  skew_forward_kl  p_S h = -(1 - alpha) p_S p_T / m,  m = alpha p_T + (1 - alpha) p_S
  skew_reverse_kl  h = log p_S - log m - alpha p_S / m,  m = alpha p_S + (1 - alpha) p_T
The JSD endpoints follow TRL/Liger: beta = 0 is forward KL, beta = 1 reverse KL.

Loss forms beyond the divergence (docs/spec.md section 5): a hard-label term with Liger's weights,
weight_soft_loss * divergence + weight_hard_loss * cross-entropy of the labels at temperature 1 (gradient
weight_hard_loss * (softmax(z_S) - onehot(y)), formed in the same pass over the logits); the sampled-token
policy-gradient form `kind="sampled_reverse_kl"` (adaswitch/ops/sampled.py); and the reductions "mean"
(over tokens), "sum", "none" and "sequence_mean" (summed over each sequence, averaged over sequences).
"""

from __future__ import annotations

import contextlib
import math

import torch

from adaswitch import reference
from adaswitch._backend import resolve_impl
from adaswitch._validation import (
    SAMPLED_CODE,
    SAMPLED_KIND,
    check_logits,
    check_logits_pair,
    check_loss_args,
    check_loss_weights,
    check_sampled_args,
)
from adaswitch.ops.rows import NEG_BIG, kernel_kind, loss_rows_and_grad  # noqa: F401 (re-exported)
from adaswitch.ops.sampled import (
    DEFAULT_IMPORTANCE_CAP,
    sampled_coefficients,
    sampled_rows_and_grad,
    token_logprobs,
)

REDUCTIONS = ("mean", "sum", "none", "sequence_mean")


# ----------------------------------------------------------------------------------------------------------
# argument checks (all before any work)


def autocast_off(device: torch.device):
    """A context that turns autocast off for `device`'s type: the ops pick their own precision (fp32
    accumulation, explicit casts), which autocast would override by running matmuls in bf16/fp16."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def check_reduction(reduction, lead_shape=None) -> str:
    """`lead_shape`: the inputs' leading shape; "sequence_mean" needs (..., L) with L the sequence axis."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "sequence_mean" and lead_shape is not None and len(lead_shape) < 2:
        raise ValueError(
            "reduction='sequence_mean' needs inputs of shape (batch, length, ...) with one sequence per row of "
            f"the batch, got leading shape {tuple(lead_shape)}"
        )
    return reduction


def num_sequences(lead_shape) -> int:
    """How many sequences a (..., L) leading shape holds: every index but the last (the sequence axis)."""
    return math.prod(lead_shape[:-1])


def check_labels(labels, lead_shape, device, ignore_index, name="labels") -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"{name} must have the logits' leading shape {tuple(lead_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {labels.device}")


def check_num_items(num_items_in_batch, reduction, device) -> None:
    """Python numbers and CPU tensors must be > 0 (reading a CPU tensor costs no device sync); a tensor on
    an accelerator must hold one value and is not read (that would be a host sync): a value <= 0 there gives
    a NaN loss (see `reduction_scale`)."""
    if num_items_in_batch is None:
        return
    if reduction not in ("mean", "sequence_mean"):
        raise ValueError(
            "num_items_in_batch only applies to reduction='mean' (tokens) or 'sequence_mean' (sequences), got "
            f"reduction={reduction!r}"
        )
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.device != device and num_items_in_batch.device.type != "cpu":
            raise ValueError(
                f"num_items_in_batch must be on {device} or the CPU, got {num_items_in_batch.device}"
            )
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number tensor, got {num_items_in_batch.dtype}")
        if num_items_in_batch.device.type == "cpu":
            value = float(num_items_in_batch.reshape(()))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"num_items_in_batch must be > 0, got tensor({value!r})")
        return
    if (
        isinstance(num_items_in_batch, bool)
        or not isinstance(num_items_in_batch, (int, float))
        or not math.isfinite(num_items_in_batch)
        or num_items_in_batch <= 0
    ):
        raise ValueError(f"num_items_in_batch must be a number > 0 (or a tensor), got {num_items_in_batch!r}")


def check_hard_labels(hard_labels, labels, weight_hard_loss, lead_shape, device, ignore_index) -> None:
    """The hard-label term needs targets: `hard_labels`, else `labels`."""
    check_labels(hard_labels, lead_shape, device, ignore_index, name="hard_labels")
    if hard_labels is not None and weight_hard_loss == 0.0:
        raise ValueError("hard_labels are the targets of the hard-label term: set weight_hard_loss > 0 to use them")
    if weight_hard_loss > 0.0 and hard_labels is None and labels is None:
        raise ValueError("weight_hard_loss > 0 needs labels (or hard_labels): the token ids the hard-label term "
                         "predicts, ignore_index where there is none")


def check_label_range(targets: torch.Tensor, used: torch.Tensor, vocab: int, name: str) -> None:
    """Targets where `used` must lie in [0, vocab): read on the CPU (no sync there), asserted on the device
    without a sync elsewhere (a CUDA error at the next synchronisation rather than a wrong loss)."""
    ok = ((targets >= 0) & (targets < vocab)) | ~used
    if targets.device.type == "cpu":
        if not bool(ok.all()):
            bad = targets[~ok][0].item()
            raise ValueError(f"{name} must be token ids in [0, {vocab}) or ignore_index, got {bad}")
    else:
        torch._assert_async(ok.all(), f"{name} must be token ids in [0, {vocab}) or ignore_index")


def hard_term(labels, hard_labels, ignore_index, valid, weight_hard_loss, vocab):
    """(targets [N] int64, weights [N] float64) of the hard-label term, or None without one. Positions ignored
    in `labels` (not in `valid`) are ignored here too; an ignored target gets weight 0 and id 0."""
    if weight_hard_loss == 0.0:
        return None
    source = (hard_labels if hard_labels is not None else labels).reshape(-1)
    used = source != ignore_index
    if valid is not None:
        used = used & valid
    check_label_range(source, used, vocab, "hard_labels" if hard_labels is not None else "labels")
    targets = torch.where(used, source, torch.zeros_like(source)).long()
    weights = used.to(torch.float64) * weight_hard_loss
    return targets, weights


def reduction_scale(valid, n_rows, reduction, num_items_in_batch, device, n_sequences=None,
                    dtype=torch.float32) -> torch.Tensor:
    """The factor each row's loss is multiplied by, as a one-element `dtype` device tensor (no sync; float64
    for float64 inputs, so that their loss and gradient are not rounded to float32 here):
    1 for sum / none; 1 / num_items_in_batch, or 1 / max(valid count, 1) for mean; 1 / num_items_in_batch,
    or 1 / the number of sequences for sequence_mean."""
    if reduction not in ("mean", "sequence_mean"):
        return torch.ones(1, dtype=dtype, device=device)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):  # > 0 checked on the CPU; on a device: NaN if <= 0
            n = num_items_in_batch.to(device=device, dtype=dtype).reshape(1)
            return torch.where(n > 0, 1.0 / n, torch.full_like(n, math.nan))
        return torch.full((1,), 1.0 / float(num_items_in_batch), dtype=dtype, device=device)
    if reduction == "sequence_mean":
        return torch.full((1,), 1.0 / max(n_sequences, 1), dtype=dtype, device=device)
    if valid is None:
        return torch.full((1,), 1.0 / max(n_rows, 1), dtype=dtype, device=device)
    return (1.0 / valid.sum().clamp_min(1).to(dtype)).reshape(1)


def reduce_rows(rows, scale, reduction, lead_shape):
    """Applies the reduction to already-masked per-row losses (differentiable, no sync)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    return total * scale.to(total.dtype).reshape(()) if reduction in ("mean", "sequence_mean") else total


# ----------------------------------------------------------------------------------------------------------
# autograd


class DistillLossFunction(torch.autograd.Function):
    """Forward computes the loss and d loss / d student_logits; backward scales that by grad_output.

    `rows_fn(student_2d, want_grad) -> (rows, grad)` is the computation (a closure over the teacher side
    and the constants): `loss_plan` builds it for every loss form. The saved gradient is scaled in place
    (no second [N, V] buffer), so one graph can be differentiated once: a second backward through the same
    graph (retain_graph=True) raises.
    """

    @staticmethod
    def forward(ctx, student, rows_fn, scale, reduction):
        vocab = student.shape[-1]
        want_grad = ctx.needs_input_grad[0]
        rows, grad = rows_fn(student.reshape(-1, vocab), want_grad)
        ctx.reduction = reduction
        ctx.student_shape = student.shape
        ctx.used = False
        if want_grad:
            ctx.save_for_backward(grad)
        return reduce_rows(rows, scale, reduction, student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError(
                "distill_loss supports one backward per forward (its saved gradient is scaled in place)"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))
        else:
            grad.mul_(grad_output.to(grad.dtype))
        return grad.view(ctx.student_shape), None, None, None


def check_loss_call(kind, beta, alpha, temperature, reduction, lead_shape, device, labels, ignore_index,
                    num_items_in_batch, weight_hard_loss, weight_soft_loss, hard_labels, discount,
                    importance_cap, teacher_sampled):
    """Every argument check of the loss ops (dense, fused-linear, sampled-token), before any work; returns
    (kind_code, beta, alpha, temperature, weight_hard_loss, weight_soft_loss, discount, importance_cap)."""
    kind_code, beta, alpha, temperature = check_loss_args(kind, beta, alpha, temperature)
    check_reduction(reduction, lead_shape)
    check_labels(labels, lead_shape, device, ignore_index)
    check_num_items(num_items_in_batch, reduction, device)
    weight_hard_loss, weight_soft_loss = check_loss_weights(weight_hard_loss, weight_soft_loss)
    check_hard_labels(hard_labels, labels, weight_hard_loss, lead_shape, device, ignore_index)
    discount, importance_cap = check_sampled_args(discount, importance_cap)
    sampled = kind_code == SAMPLED_CODE
    if sampled and labels is None:
        raise ValueError(f"kind={SAMPLED_KIND!r} needs labels: the sampled token at each position "
                         "(ignore_index where there is none)")
    if not sampled and (discount != 0.0 or teacher_sampled is not None or importance_cap != DEFAULT_IMPORTANCE_CAP):
        raise ValueError(f"discount, importance_cap and teacher_sampled apply to kind={SAMPLED_KIND!r}, "
                         f"got kind={kind!r}")
    if sampled and discount != 0.0 and len(lead_shape) < 2:
        raise ValueError("discount > 0 sums over later tokens of each sequence: inputs must be (batch, length, "
                         f"...), got leading shape {tuple(lead_shape)}")
    if teacher_sampled is not None:
        if not isinstance(teacher_sampled, torch.Tensor) or teacher_sampled.dtype != torch.bool:
            raise TypeError("teacher_sampled must be a bool tensor (True where the teacher wrote the token), got "
                            f"{getattr(teacher_sampled, 'dtype', type(teacher_sampled).__name__)}")
        if tuple(teacher_sampled.shape) != tuple(lead_shape) or teacher_sampled.device != device:
            raise ValueError(f"teacher_sampled must have the leading shape {tuple(lead_shape)} on {device}, got "
                             f"{tuple(teacher_sampled.shape)} on {teacher_sampled.device}")
    return kind_code, beta, alpha, temperature, weight_hard_loss, weight_soft_loss, discount, importance_cap


class LossPlan:
    """What one call of a loss op computes, resolved once from its checked arguments: the valid rows, the
    reduction's scale, the hard-label term and the per-row computation for each form. The fused-linear loss
    runs the same plan on chunks of rows."""

    def __init__(self, *, kind_code, beta, alpha, temperature, lead_shape, vocab, device, labels, ignore_index,
                 reduction, num_items_in_batch, weight_hard_loss, weight_soft_loss, hard_labels, discount,
                 importance_cap, teacher_sampled, which, dtype):
        n = math.prod(lead_shape)
        if weight_soft_loss == 0.0 and kind_code != SAMPLED_CODE:
            kind_code = -1  # the hard-label term alone: the teacher is not read
        self.kind_code, self.beta, self.alpha, self.temperature = kind_code, beta, alpha, temperature
        self.which, self.reduction, self.lead_shape = which, reduction, tuple(lead_shape)
        self.soft_weight, self.discount, self.importance_cap = weight_soft_loss, discount, importance_cap
        self.sampled = kind_code == SAMPLED_CODE
        self.valid = None if labels is None else (labels != ignore_index).reshape(-1)
        self.scale = reduction_scale(self.valid, n, reduction, num_items_in_batch, device,
                                     n_sequences=num_sequences(lead_shape) if len(lead_shape) >= 2 else None,
                                     dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        self.hard = hard_term(labels, hard_labels, ignore_index, self.valid, weight_hard_loss, vocab)
        if self.hard is not None:
            self.hard = (*self.hard, 1.0)  # Liger's hard term: cross-entropy of the raw logits (T = 1)
        self.targets = None
        self.hard_on_sampled_tokens = hard_labels is None  # the hard term's targets are then the labels
        self.teacher_sampled = None if teacher_sampled is None else teacher_sampled.reshape(-1)
        if self.sampled and self.hard is not None and self.hard_on_sampled_tokens:
            self.targets = self.hard[0]  # the same ids, already checked by hard_term
        elif self.sampled:
            flat = labels.reshape(-1)
            check_label_range(flat, self.valid, vocab, "labels")
            self.targets = torch.where(self.valid, flat, torch.zeros_like(flat)).long()

    def dense_rows(self, s2d, t2d, valid, scale, want_grad, hard):
        """Rows and gradient of a divergence form (soft term and hard-label term) on rows `s2d`, `t2d`."""
        return loss_rows_and_grad(
            s2d, t2d, kind_code=self.kind_code, beta=self.beta, alpha=self.alpha, temperature=self.temperature,
            valid=valid, scale=scale, want_grad=want_grad, which=self.which, soft_weight=self.soft_weight, hard=hard,
        )

    def token_logprobs(self, x2d, rows=slice(None)):
        """log p(sampled token) at the loss temperature for rows `rows` of the plan (student or teacher)."""
        valid = None if self.valid is None else self.valid[rows]
        return token_logprobs(x2d, self.targets[rows], valid, self.temperature, self.which)

    def coefficients(self, lp_s, lp_t, rows=slice(None)):
        """The sampled form's soft_weight * w_t * A_t of rows `rows` (all rows of a sequence when discount > 0)."""
        return sampled_coefficients(
            lp_s, lp_t, None if self.valid is None else self.valid[rows], seq_len=self.lead_shape[-1],
            discount=self.discount,
            teacher_sampled=None if self.teacher_sampled is None else self.teacher_sampled[rows],
            importance_cap=self.importance_cap, soft_weight=self.soft_weight,
        )

    def sampled_rows(self, s2d, lp_s, coef, scale, want_grad, rows=slice(None)):
        hard = None if self.hard is None else (self.hard[0][rows], self.hard[1][rows], self.hard[2])
        return sampled_rows_and_grad(
            s2d, lp_s, coef, self.targets[rows], None if self.valid is None else self.valid[rows],
            temperature=self.temperature, scale=scale, want_grad=want_grad, which=self.which, hard=hard,
            hard_on_sampled_tokens=self.hard_on_sampled_tokens,
        )

    def rows_fn(self, teacher):
        """`DistillLossFunction`'s computation for dense teacher logits (2-D), or, for the sampled form only,
        the teacher's log-probabilities of the sampled tokens ([N])."""
        if not self.sampled:
            return lambda s2d, want_grad: self.dense_rows(s2d, teacher, self.valid, self.scale, want_grad, self.hard)

        def sampled(s2d, want_grad):
            lp_t = teacher if teacher.dim() == 1 else self.token_logprobs(teacher)
            lp_s = self.token_logprobs(s2d)
            return self.sampled_rows(s2d, lp_s, self.coefficients(lp_s, lp_t), self.scale, want_grad)

        return sampled


def loss_plan(*, kind, beta, alpha, temperature, lead_shape, vocab, device, dtype, labels, ignore_index, reduction,
              num_items_in_batch, weight_hard_loss, weight_soft_loss, hard_labels, discount, importance_cap,
              teacher_sampled, impl) -> LossPlan:
    """Every check of a loss op's arguments (`check_loss_call`, before any work), the implementation, and the
    resolved `LossPlan`: what `distill_loss`, `sampled_token_loss` and `fused_linear_distill_loss` share."""
    kind_code, beta, alpha, temperature, weight_hard_loss, weight_soft_loss, discount, importance_cap = \
        check_loss_call(kind, beta, alpha, temperature, reduction, lead_shape, device, labels, ignore_index,
                        num_items_in_batch, weight_hard_loss, weight_soft_loss, hard_labels, discount,
                        importance_cap, teacher_sampled)
    which = resolve_impl(impl, device, native_op="distill_loss_rows")
    with autocast_off(device):
        return LossPlan(
            kind_code=kind_code, beta=beta, alpha=alpha, temperature=temperature, lead_shape=lead_shape, vocab=vocab,
            device=device, labels=labels, ignore_index=ignore_index, reduction=reduction,
            num_items_in_batch=num_items_in_batch, weight_hard_loss=weight_hard_loss,
            weight_soft_loss=weight_soft_loss, hard_labels=hard_labels, discount=discount,
            importance_cap=importance_cap, teacher_sampled=teacher_sampled, which=which, dtype=dtype,
        )


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
    hard_labels: torch.Tensor | None = None,
    discount: float = 0.0,
    importance_cap: float = DEFAULT_IMPORTANCE_CAP,
    teacher_sampled: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits, differentiable w.r.t. `student_logits`.

    Args:
        student_logits, teacher_logits: (..., V) float16/bfloat16/float32/float64 tensors of one shape.
            The teacher is a constant (no gradient flows to it).
        kind: "forward_kl" (KL(p_T||p_S), default), "reverse_kl", "jsd", "tvd", "skew_forward_kl",
            "skew_reverse_kl" (docs/spec.md section 1), at `temperature` (no T^2 factor, like TRL); or
            "sampled_reverse_kl", the sampled-token policy-gradient form of on-policy distillation
            (adaswitch/ops/sampled.py; `labels` are the sampled tokens).
        beta: JSD weight, TRL/Liger convention (0 = forward KL, 1 = reverse KL).
        alpha: skew weight of the skewed KLs.
        labels: optional integer tensor of the leading shape: the token each position predicts (the
            hard-label term's targets, the sampled-token form's tokens); positions equal to `ignore_index`
            count neither in the loss nor in the mean's divisor and get a zero gradient.
        reduction: "mean" (over valid tokens; `num_items_in_batch` replaces the count, as in TRL, for
            gradient accumulation), "sum", "none" (per-position losses, 0 at ignored positions), or
            "sequence_mean" (inputs (B, L, V): each sequence's summed loss, averaged over the B sequences, as
            TRL's "batchmean" without labels; `num_items_in_batch` replaces B).
        weight_hard_loss, weight_soft_loss: Liger's weights: the loss is weight_soft_loss * the distillation
            term + weight_hard_loss * the cross-entropy of the raw student logits (temperature 1) with
            `hard_labels` (default `labels`) as targets; both terms share the reduction's divisor.
        hard_labels: the hard-label term's own targets (e.g. only the teacher-written tokens); positions
            ignored in `labels` are ignored here too.
        discount, importance_cap, teacher_sampled: the sampled-token form's discount over later tokens of a
            sequence (0 = per-token), cap of the importance weight p_S / p_T, and the positions whose token
            the teacher wrote (bool, leading shape), which get that weight.
        impl: "auto" (Triton on CUDA, the native op on CPU when built, else PyTorch), "triton",
            "native" or "torch".

    Accumulates in float32 (float64 for float64 inputs on the PyTorch path), inside `torch.autocast` too;
    the gradient is returned in the student's dtype. If every position is ignored, the loss is 0 with a
    zero gradient.
    """
    check_logits_pair(student_logits, teacher_logits)
    device = student_logits.device
    vocab = student_logits.shape[-1]
    plan = loss_plan(
        kind=kind, beta=beta, alpha=alpha, temperature=temperature, lead_shape=student_logits.shape[:-1], vocab=vocab,
        device=device, dtype=student_logits.dtype, labels=labels, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss,
        hard_labels=hard_labels, discount=discount, importance_cap=importance_cap, teacher_sampled=teacher_sampled,
        impl=impl,
    )
    with autocast_off(device):
        teacher = teacher_logits.detach().reshape(-1, vocab)
        return DistillLossFunction.apply(student_logits, plan.rows_fn(teacher), plan.scale, reduction)


def sampled_token_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
    hard_labels: torch.Tensor | None = None,
    discount: float = 0.0,
    importance_cap: float = DEFAULT_IMPORTANCE_CAP,
    teacher_sampled: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """`distill_loss(..., kind="sampled_reverse_kl")` from the teacher's log-probability of each sampled
    token alone (`teacher_logprobs`, the labels' shape, at `temperature`; e.g. what a served teacher returns
    for given tokens): no teacher logits are needed. Other arguments as in `distill_loss`."""
    check_logits("student_logits", student_logits)
    lead_shape = student_logits.shape[:-1]
    device = student_logits.device
    if labels is None:
        raise ValueError("labels must be the sampled tokens (an integer tensor of the logits' leading shape)")
    if not isinstance(teacher_logprobs, torch.Tensor) or not teacher_logprobs.dtype.is_floating_point:
        raise TypeError(f"teacher_logprobs must be a float tensor, got "
                        f"{getattr(teacher_logprobs, 'dtype', type(teacher_logprobs).__name__)}")
    if tuple(teacher_logprobs.shape) != tuple(lead_shape) or teacher_logprobs.device != device:
        raise ValueError(f"teacher_logprobs must have the labels' shape {tuple(lead_shape)} on {device}, got "
                         f"{tuple(teacher_logprobs.shape)} on {teacher_logprobs.device}")
    plan = loss_plan(
        kind=SAMPLED_KIND, beta=0.5, alpha=0.1, temperature=temperature, lead_shape=lead_shape,
        vocab=student_logits.shape[-1], device=device, dtype=student_logits.dtype, labels=labels,
        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
        weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss, hard_labels=hard_labels,
        discount=discount, importance_cap=importance_cap, teacher_sampled=teacher_sampled, impl=impl,
    )
    with autocast_off(device):
        rows_fn = plan.rows_fn(teacher_logprobs.detach().reshape(-1))
        return DistillLossFunction.apply(student_logits, rows_fn, plan.scale, reduction)


def reference_distill_loss(
    student_logits,
    teacher_logits,
    kind="forward_kl",
    *,
    beta=0.5,
    alpha=0.1,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    weight_hard_loss=0.0,
    weight_soft_loss=1.0,
    hard_labels=None,
    discount=0.0,
    importance_cap=DEFAULT_IMPORTANCE_CAP,
    teacher_sampled=None,
    dtype=None,
):
    """The executable spec of the loss in plain autograd (float64 for float64 inputs): the divergence rows
    of adaswitch.reference (or the sampled-token surrogate, written out with a Python loop over positions
    for the discount), plus the hard-label cross-entropy, masked and reduced. Tests differentiate this and
    compare."""
    dtype = dtype or (torch.float64 if student_logits.dtype == torch.float64 else torch.float32)
    lead_shape = student_logits.shape[:-1]
    valid = None
    if labels is not None:
        valid = (labels != ignore_index).reshape(-1)
    if kind == SAMPLED_KIND:
        rows = _reference_sampled_rows(student_logits, teacher_logits, labels, valid, temperature, discount,
                                       importance_cap, teacher_sampled, dtype) * weight_soft_loss
    else:
        rows = reference.divergence_rows(
            student_logits,
            teacher_logits.detach(),
            kind,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            dtype=dtype,
        ).reshape(-1) * weight_soft_loss
    if weight_hard_loss:
        targets = (hard_labels if hard_labels is not None else labels).reshape(-1)
        used = targets != ignore_index
        if valid is not None:
            used = used & valid
        ce = torch.nn.functional.cross_entropy(
            student_logits.reshape(-1, student_logits.shape[-1]).to(dtype), torch.where(used, targets, 0),
            reduction="none",
        )
        rows = rows + weight_hard_loss * torch.where(used, ce, ce.new_zeros(()))
    if valid is not None:
        rows = torch.where(valid, rows, rows.new_zeros(()))
    n_seq = num_sequences(lead_shape) if len(lead_shape) >= 2 else None
    scale = reduction_scale(valid, rows.numel(), reduction, num_items_in_batch, rows.device, n_sequences=n_seq,
                            dtype=rows.dtype)
    return reduce_rows(rows, scale, reduction, lead_shape)


def _reference_sampled_rows(student_logits, teacher_logits, labels, valid, temperature, discount, importance_cap,
                            teacher_sampled, dtype):
    """sum_t w_t A_t exp(lp_S - sg(lp_S)) per position, term by term (see adaswitch/ops/sampled.py)."""
    vocab = student_logits.shape[-1]
    y = torch.where(valid, labels.reshape(-1), 0)[:, None]
    lp_s = torch.log_softmax(student_logits.reshape(-1, vocab).to(dtype) / temperature, -1).gather(-1, y)[:, 0]
    lp_t = torch.log_softmax(teacher_logits.detach().reshape(-1, vocab).to(dtype) / temperature, -1).gather(-1, y)[:, 0]
    delta = torch.where(valid, lp_s.detach() - lp_t, lp_s.new_zeros(()))
    length = student_logits.shape[-2] if student_logits.dim() >= 3 else delta.numel()
    per_seq = delta.reshape(-1, length)
    adv = torch.zeros_like(per_seq)
    for t in range(length):
        for k in range(t, length if discount else t + 1):
            adv[:, t] += discount ** (k - t) * per_seq[:, k]
    adv = adv.reshape(-1)
    if teacher_sampled is not None:
        ratio = torch.minimum(delta.exp(), torch.tensor(importance_cap, dtype=dtype))
        adv = torch.where(teacher_sampled.reshape(-1), ratio * adv, adv)
    return adv * torch.exp(lp_s - lp_s.detach())
