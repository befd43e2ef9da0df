"""The embedded demo: a synthetic arithmetic-reasoning task, a shipped teacher checkpoint, a small
student, and a runner comparing every distillation method on the same budget (`adaswitch demo`)."""
