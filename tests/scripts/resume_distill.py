"""Six Distiller steps (checkpoint every 2) on 8 rows, optionally SIGKILLed while writing a checkpoint.

    python tests/scripts/resume_distill.py OUT                 # uninterrupted
    python tests/scripts/resume_distill.py OUT --kill-at 4     # SIGKILL inside the save of checkpoint-4
    python tests/scripts/resume_distill.py OUT --resume        # continue from OUT's last checkpoint

Writes OUT/final.pt (float64 weights) when training completes. Used by tests/test_resume.py.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

import datasets

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_run import rows, state_dict_file, tiny_student, tiny_teacher, tiny_tokenizer  # noqa: E402

from adaswitch import DistillConfig, Distiller  # noqa: E402


class KilledWhileSaving(Distiller):
    """Dies with SIGKILL after the model and optimizer of checkpoint `kill_at` are written, before the
    rest: the worst moment for a checkpoint written in place."""

    kill_at = -1

    def _save_rng_state(self, output_dir):
        if self.state.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_rng_state(output_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = DistillConfig(
        output_dir=args.out,
        report_to=[],
        use_cpu=True,
        seed=0,
        per_device_train_batch_size=4,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1e-2,
        policy="adaswitch",
        window=1,
        k=1e-3,
        max_new_tokens=5,
        # bit-identical weights need the same teacher-state rounding: "auto" picks block widths by timing
        lookahead=0,
    )
    KilledWhileSaving.kill_at = args.kill_at
    trainer = KilledWhileSaving(
        model=tiny_student(max_positions=64).train(),
        teacher_model=tiny_teacher(max_positions=64),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows(8)),
        processing_class=tiny_tokenizer(),
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    state_dict_file(trainer.model, Path(args.out) / "final.pt")


if __name__ == "__main__":
    main()
