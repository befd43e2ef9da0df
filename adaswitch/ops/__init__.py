"""Public ops other KD code imports (SPEC.md section 6). Names here are stable."""

from adaswitch.ops.divergence import token_divergence
from adaswitch.ops.step import SwitchState, fused_lookahead, fused_step

__all__ = ["SwitchState", "fused_lookahead", "fused_step", "token_divergence"]
