"""FSDP2 on CUDA: the checks of tests/test_fsdp.py for a GPU machine (one GPU is enough).

    python tests/scripts/fsdp_gpu_check.py OUT [NPROC]      # NPROC defaults to the number of GPUs

Runs tests/scripts/fsdp_distill.py under `torchrun --nproc_per_node NPROC --fsdp` (NCCL, the student
sharded by accelerate, the teacher placed on the GPU by the Distiller) and as one process without FSDP,
and compares them: the same response tokens, losses and evaluation loss within 1e-3, the weight updates
within 1e-2 (cuBLAS may sum in another order for another batch shape). Exits 1 on a mismatch.
"""

import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent / "fsdp_distill.py"
sys.path.insert(0, str(SCRIPT.parent.parent))
from distributed_runs import merged_responses, run  # noqa: E402
from tiny_models import tiny_student  # noqa: E402


def _run(out: Path, nproc: int | None) -> tuple[list[dict], dict]:
    """FSDP under torchrun with nproc processes (NCCL), or one process without FSDP (nproc None)."""
    extra = ["--fsdp"] if nproc else []
    return run(SCRIPT, out, *extra, world=nproc or 1, torchrun=bool(nproc))


_responses = merged_responses


def main(out: str, nproc: int) -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: run tests/test_fsdp.py on CPU instead")
        return 1
    fsdp, w_fsdp = _run(Path(out) / "fsdp", nproc)
    single, w_one = _run(Path(out) / "single", None)
    problems = []
    if not (fsdp[0]["fsdp"] and fsdp[0]["world"] == nproc):
        problems.append(f"FSDP not enabled: {fsdp[0]['fsdp']=}, {fsdp[0]['world']=}")
    if _responses(fsdp) != _responses(single):
        problems.append(f"responses differ:\n{_responses(fsdp)}\n{_responses(single)}")
    losses = [(a["loss"], b["loss"]) for a, b in zip(fsdp[0]["steps"], single[0]["steps"])]
    losses.append((fsdp[0]["eval_loss"], single[0]["eval_loss"]))
    for a, b in losses:
        if abs(a - b) > 1e-3 * abs(b):
            problems.append(f"loss {a} (FSDP) vs {b} (one process)")
    init = tiny_student(max_positions=64).state_dict()
    worst = 0.0
    for name, w in w_fsdp.items():
        step_fsdp, step_one = w - init[name].double(), w_one[name] - init[name].double()
        worst = max(worst, float((step_fsdp - step_one).norm() / step_one.norm().clamp(min=1e-30)))
    if worst > 1e-2:
        problems.append(f"weight updates differ: worst relative difference {worst:.2e}")
    print(f"{torch.cuda.get_device_name()}: FSDP2 x{nproc} vs one process: losses {losses}, "
          f"worst update difference {worst:.2e}, sharded {fsdp[0]['sharded_params']}/{fsdp[0]['params']}")
    print("\n".join(problems) or "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else torch.cuda.device_count()))
