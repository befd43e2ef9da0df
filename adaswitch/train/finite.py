"""Non-finite training stops with an error instead of ending "successfully" with NaN weights.

A NaN or inf loss or gradient norm (a learning rate that blows the weights up, NaN weights, bad logits) is
looked for where the host already reads those numbers: every log of the training loop (`check_logs`), so no
step pays an extra device-to-host read; and every save reads the weights anyway, so a checkpoint or a final
model is written only when they are finite (`check_weights`). The run then stops with a `NonFiniteError` that
says which step and which quantity, the checkpoints saved before it intact.
"""

from __future__ import annotations

import math

import torch

# The logged training quantities that must be finite: Trainer's running loss and gradient norm, and the
# mean loss of the whole run it logs at the end.
CHECKED_LOGS = ("loss", "grad_norm", "train_loss")


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient norm or weight."""


def check_logs(logs: dict, *, step: int, since: int) -> None:
    """Raises NonFiniteError when a logged training quantity is NaN or infinite; `since` is the step of the
    previous log (the loss covers the steps since then)."""
    bad = {k: logs[k] for k in CHECKED_LOGS if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])}
    if not bad:
        return
    steps = f"step {step}" if step - since <= 1 else f"steps {since + 1}-{step}"
    what = ", ".join(f"the {k.replace('_', ' ')} is {v}" for k, v in bad.items())
    raise NonFiniteError(
        f"training stopped at step {step}: {what} (logged over {steps}); the weights are not saved, the "
        "checkpoints saved before are intact. Lower the learning rate, check the models' weights and dtype "
        "(fp16 overflows), or resume from the last checkpoint with other settings in a new output directory"
    )


@torch.no_grad()
def first_non_finite(model) -> str | None:
    """The name of the first parameter of `model` holding a NaN or inf, or None (empty ZeRO-3 partitions and
    meta tensors hold nothing to check). One host read per floating-point parameter."""
    for name, p in model.named_parameters():
        if p.is_meta or not p.is_floating_point() or p.numel() == 0:
            continue
        if not bool(torch.isfinite(p).all()):
            return name
    return None


def check_weights(model, *, what: str, when: str) -> None:
    """Raises NonFiniteError naming the parameter when `model` (`what`, e.g. "the student") holds a NaN or
    inf weight; `when` says what was about to happen (e.g. "before saving checkpoint-4")."""
    name = first_non_finite(model)
    if name is not None:
        raise NonFiniteError(
            f"{what}'s weights are not finite ({name} holds NaN or inf) {when}: nothing was written; lower the "
            "learning rate or check the model's weights (a model saved with NaN weights cannot be distilled)"
        )


__all__ = ["NonFiniteError", "check_logs", "check_weights", "first_non_finite"]
