"""Public ops other KD code imports (docs/spec.md section 7). Names here are stable."""

from adaswitch.ops.divergence import token_divergence
from adaswitch.ops.fused_linear import fused_linear_distill_loss
from adaswitch.ops.loss import distill_loss, sampled_token_loss
from adaswitch.ops.modules import DistillLoss, FusedLinearDistillLoss
from adaswitch.ops.sparse import SparseTeacher, sparse_distill_loss, topk_teacher_logprobs
from adaswitch.ops.speculative import SpeculativeOutput, fused_speculative
from adaswitch.ops.step import SwitchState, fused_lookahead, fused_step

__all__ = [
    "DistillLoss", "FusedLinearDistillLoss", "SparseTeacher", "distill_loss", "fused_linear_distill_loss",
    "sparse_distill_loss", "topk_teacher_logprobs", "sampled_token_loss",
    "SwitchState", "fused_lookahead", "fused_step", "token_divergence", "SpeculativeOutput", "fused_speculative"]
