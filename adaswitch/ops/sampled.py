"""The sampled-token form of on-policy distillation (`kind="sampled_reverse_kl"`, docs/spec.md section 5).

On the sequence the policy generated, the reverse KL is estimated on the sampled token alone:
delta_t = log p_S(y_t) - log p_T(y_t) (at the loss temperature), whose mean under y_t ~ p_S is
KL(p_S || p_T). It is used as a (negated) advantage in a policy-gradient loss on the student's
log-probabilities, as in the Thinking Machines on-policy distillation recipe, TRL's MiniLLM trainer, verl and
NeMo RL:

    L = sum_t weight_soft_loss * w_t * A_t * exp(log p_S(y_t) - sg(log p_S(y_t))),
    A_t = sg(sum_{k >= t} discount^(k - t) delta_k)     (the discounted sum over later tokens of one sequence)

so L's value is the (discounted) estimate itself and dL/dz_S,t = w_t A_t (onehot(y_t) - p_S,t) / T: in
expectation over y ~ p_S exactly the gradient of the reverse KL (discount 0), since E[grad log p_S(y)] = 0.
w_t is the importance weight of a token the student did not sample: for a teacher-written token (SKD's
replacements, AdaSwitch after its switch, SeqKD) it is min(p_S(y_t) / p_T(y_t), importance_cap), the ratio
of the distribution the estimator averages over (the student's) to the one that drew the token (the
teacher's), truncated as in verl's truncated importance sampling; 1 for the student's own tokens.

Only each sampled token's teacher log-probability is needed, so `sampled_token_loss` takes those directly
(a served or offline teacher that returns log-probs of given tokens), and no [N, V] teacher tensor exists.
The student's log-probabilities and the gradient come from the loss kernels' hard-label term (kind code -1:
no soft term): one pass for log p_S(y_t), a second for the gradient once A_t is known (A_t needs the later
tokens of each sequence).
"""

from __future__ import annotations

import math

import torch

from adaswitch.ops.rows import loss_rows_and_grad

DEFAULT_IMPORTANCE_CAP = 2.0  # verl's default truncation of rollout importance weights


def token_logprobs(x2d, targets, valid, temperature, which) -> torch.Tensor:
    """log softmax(x / T)[targets] per row of the 2-D `x2d` (float32, or float64 for float64 inputs on the
    PyTorch path); rows where `valid` is False give 0. No gradient."""
    n = x2d.shape[0]
    ones = torch.ones(n, dtype=torch.float32, device=x2d.device)  # fp32 is exact for 1
    rows, _ = loss_rows_and_grad(
        x2d, x2d, kind_code=-1, beta=0.0, alpha=0.0, temperature=temperature, valid=valid, scale=ones[:1],
        want_grad=False, which=which, hard=(targets, ones, 1.0 / temperature),
    )
    return -rows


def discounted_returns(delta: torch.Tensor, discount: float) -> torch.Tensor:
    """A_t = sum_{k >= t} discount^(k - t) delta_k along the last axis of `delta` ([..., L]): one matrix
    product with the [L, L] upper-triangular matrix of powers (no loop over positions)."""
    if discount == 0.0:
        return delta
    length = delta.shape[-1]
    pos = torch.arange(length, device=delta.device)
    gap = (pos[:, None] - pos[None, :]).to(torch.float64)  # [k, t]: k - t
    if discount == 1.0:
        powers = (gap >= 0).to(torch.float64)
    else:
        powers = torch.where(gap >= 0, torch.exp(gap.clamp_min(0) * math.log(discount)), torch.zeros_like(gap))
    return delta @ powers.to(delta.dtype)


def sampled_coefficients(lp_s, lp_t, valid, *, seq_len, discount, teacher_sampled, importance_cap, soft_weight):
    """Each row's soft_weight * w_t * A_t ([N], no gradient) from the student's and the teacher's log-probs of
    the sampled tokens ([N] each); rows not `valid` contribute nothing and get 0."""
    lp_s = lp_s.to(torch.float64 if lp_s.dtype == torch.float64 else torch.float32)
    delta = lp_s - lp_t.to(lp_s.dtype)
    if valid is not None:
        delta = torch.where(valid, delta, torch.zeros_like(delta))
    adv = discounted_returns(delta.reshape(-1, seq_len), discount).reshape(-1) if discount else delta
    if teacher_sampled is not None:
        ratio = torch.exp(delta.clamp(max=math.log(importance_cap)))  # min(p_S / p_T, cap)
        adv = torch.where(teacher_sampled, ratio * adv, adv)
    if valid is not None:
        adv = torch.where(valid, adv, torch.zeros_like(adv))
    return soft_weight * adv


def sampled_rows_and_grad(s2d, lp_s, coef, targets, valid, *, temperature, scale, want_grad, which, hard=None,
                          hard_on_sampled_tokens=False):
    """Loss rows (coef, plus a hard-label term's weight * -log p(target)) and, if `want_grad`, the gradient
    w.r.t. `s2d` times `scale`. When the hard term's targets are the sampled tokens
    (`hard_on_sampled_tokens`, decided from the arguments, so nothing is compared on the device) and T = 1,
    both share one gradient pass: (hard weight - coef) * (softmax(s) - onehot); otherwise the hard term runs
    a pass of its own and the gradients add."""
    shared = hard is not None and hard_on_sampled_tokens and temperature == 1.0
    rows, hard_grad = coef, None
    if shared:  # -log p(y) at T = 1 is -lp_s, already known
        rows = coef - hard[1].to(coef.dtype) * lp_s.to(coef.dtype)
    elif hard is not None:
        hard_rows, hard_grad = loss_rows_and_grad(
            s2d, s2d, kind_code=-1, beta=0.0, alpha=0.0, temperature=temperature, valid=valid, scale=scale,
            want_grad=want_grad, which=which, hard=hard,
        )
        rows = coef + hard_rows.to(coef.dtype)
    if not want_grad:
        return rows, None
    weights = -coef + hard[1].to(coef.dtype) if shared else -coef
    _, grad = loss_rows_and_grad(
        s2d, s2d, kind_code=-1, beta=0.0, alpha=0.0, temperature=temperature, valid=valid, scale=scale,
        want_grad=True, which=which, hard=(targets, weights, 1.0 / temperature),
    )
    if hard_grad is not None:
        grad += hard_grad
    return rows, grad
