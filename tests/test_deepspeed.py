"""DeepSpeed ZeRO-2 and ZeRO-3: `torchrun --nproc_per_node 2` (gloo, CPU; DeepSpeed's CPU accelerator) with the
student in a DeepSpeed engine (and gradient accumulation) trains like one process on the same global batch,
generates the same tokens, evaluates alike, writes DeepSpeed's checkpoint, and (ZeRO-3) resumes from it exactly.
The ZeRO-3 run loads both models with `from_pretrained` after the config, so they arrive partitioned by
`zero.Init`: generation gathers the student and the teacher, and the teacher stays partitioned at rest.

Nothing in accelerate is patched: under torchrun DeepSpeed runs on CPU processes as it does on GPUs (the two CPU
differences are in tests/scripts/deepspeed_distill.py's docstring). Where accelerate drops DeepSpeed (told to use
the CPU), and for the ZeRO stages not tested here (0, 1), Distiller refuses rather than silently running DDP.
"""

import os
from pathlib import Path

import pytest
import torch
from distributed_runs import merged_responses, run
from scripts.tiny_run import rows, write_models
from tiny_models import tiny_student, tiny_teacher, tiny_tokenizer

pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install deepspeed)")

SCRIPT = Path(__file__).resolve().parent / "scripts" / "deepspeed_distill.py"


def _run(out, *extra, world=2):
    return run(SCRIPT, out, *extra, world=world)


_responses = merged_responses


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, no DeepSpeed, batch 4."""
    return _run(tmp_path_factory.mktemp("single"), world=1)


def _matches_single(ds, w_ds, single, stage):
    logs, w_one = single
    assert ds[0]["deepspeed"] and ds[0]["world"] == 2 and ds[0]["zero_stage"] == stage
    assert ds[0]["engine"] == "DeepSpeedEngine" and not logs[0]["deepspeed"]
    # generation on full weights: the tokens of the one-process model, row by row
    assert _responses(ds) == _responses(logs)
    assert len(ds[0]["steps"]) == len(logs[0]["steps"]) == 3
    for a, b in zip(ds[0]["steps"], logs[0]["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # global token mean over 2 ranks x 2 micro-batches
        assert a["loss_tokens"] == b["loss_tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)  # DeepSpeed's clipping sees the same
    assert ds[0]["eval_loss"] == pytest.approx(logs[0]["eval_loss"], rel=1e-4)
    init = tiny_student(max_positions=64).state_dict()
    assert w_ds.keys() == w_one.keys()
    for name, w in w_ds.items():
        step_ds, step_one = w - init[name].double(), w_one[name] - init[name].double()
        assert step_one.norm() > 0, name
        assert (step_ds - step_one).norm() <= 1e-3 * step_one.norm(), f"{name}: ZeRO-{stage} update differs"


def _checkpoint_files(out, step):
    files = set(os.listdir(out / f"checkpoint-{step}"))
    assert {"latest", f"global_step{step}", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= files
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(
        os.listdir(out / f"checkpoint-{step}" / f"global_step{step}")
    )  # each rank's optimizer partition
    return files


@pytest.mark.slow
def test_zero2_matches_one_process(tmp_path, single):
    ds, w_ds = _run(tmp_path / "zero2", "--stage", "2")
    assert ds[0]["partitioned_params"] == 0  # ZeRO-2 partitions the optimizer state and gradients only
    _matches_single(ds, w_ds, single, stage=2)
    assert sorted(p for p in os.listdir(tmp_path / "zero2") if p.startswith("checkpoint")) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert "model.safetensors" in _checkpoint_files(tmp_path / "zero2", 2)


@pytest.mark.slow
def test_zero3_partitioned_models_match_one_process_and_resume(tmp_path, single):
    teacher_dir, _ = write_models(tmp_path / "models")
    models = str(Path(teacher_dir).parent)
    ds, w_ds = _run(tmp_path / "zero3", "--stage", "3", "--models", models)
    # every parameter of the student is partitioned; the teacher arrived partitioned and stays so at rest
    assert ds[0]["partitioned_params"] == ds[0]["params"] > 0
    assert ds[0]["teacher_partitioned"] and ds[0]["teacher_partitioned_after"]
    _matches_single(ds, w_ds, single, stage=3)
    _checkpoint_files(tmp_path / "zero3", 2)

    # resume from step 2 under ZeRO-3: step 3 repeats the uninterrupted run (weights, optimizer, draws)
    resumed, w_resumed = _run(
        tmp_path / "resumed", str(tmp_path / "zero3" / "checkpoint-2"), "--stage", "3", "--models", models
    )
    full = _responses(ds)  # keyed by the global step before it: training 0, 1, 2, then evaluation 3
    assert _responses(resumed) == {"2": full["2"], "3": full["3"]}
    assert resumed[0]["steps"][-1]["loss"] == pytest.approx(ds[0]["steps"][-1]["loss"], rel=1e-6)
    for name, w in w_ds.items():
        assert torch.allclose(w_resumed[name], w, rtol=0, atol=1e-7), f"{name}: resumed run differs"


@pytest.fixture
def deepspeed_in_this_process():
    """A DeepSpeed config in this (pytest) process leaves global state behind: TrainingArguments sets
    ACCELERATE_USE_DEEPSPEED in os.environ (inherited by every process a later test launches),
    transformers registers the config for from_pretrained, accelerate keeps its state singletons. Undo all
    of it so the tests after this one run without DeepSpeed."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        unset_hf_deepspeed_config()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _distiller(tmp_path, stage):
    import datasets

    from adaswitch import DistillConfig, Distiller

    config = DistillConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        deepspeed={"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto"},
        max_steps=1,
        policy="adaswitch",
        max_new_tokens=4,
    )
    return Distiller(
        model=tiny_student(max_positions=64),
        teacher_model=tiny_teacher(max_positions=64),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows(2)),
        processing_class=tiny_tokenizer(),
    )


@pytest.mark.parametrize(
    "stage, use_cpu_env, message",
    [
        (1, False, "Distiller supports ZeRO stage 2 and 3 (zero_optimization.stage), got stage 1"),
        # `accelerate launch --cpu`: accelerate drops the DeepSpeed plugin; not silently DDP
        (2, True, "deepspeed is set but accelerate did not enable DeepSpeed (DistributedType.NO on cpu)"),
    ],
)
def test_untested_stage_and_accelerate_cpu_are_refused(tmp_path, deepspeed_in_this_process, stage, use_cpu_env,
                                                       message):
    if use_cpu_env:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _distiller(tmp_path, stage)
