"""One tokenizer: a teacher and a student with different tokenizers are refused (API and every CLI command)
before any work, a model directory without a tokenizer is a clear error, and with embedding matrices padded
past the tokenizer (320 rows, 300 tokens) no padded id is generated nor weighs in the loss."""

import json
from pathlib import Path

import pytest
import torch
from scripts.tiny_run import rows, write_jsonl
from test_cli import assert_one_line_error, run
from tiny_models import VOCAB_SIZE, _vocabulary, tiny_distiller, tiny_student, tiny_teacher, tiny_tokenizer
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedTokenizerFast

import adaswitch.engine.generate as generate_module
from adaswitch import Distiller, cli
from adaswitch.policies import Student
from adaswitch.train import data
from adaswitch.train.evaluate import evaluate

PADDED = 320  # embedding rows of the padded pair; the tokenizer has VOCAB_SIZE = 300 tokens


def other_tokenizer() -> PreTrainedTokenizerFast:
    """Same size and same special-token ids as the tiny tokenizer, but the ordinary tokens in reverse order:
    only the vocabularies (token -> id) tell the two apart."""
    vocab = _vocabulary()
    tokens = sorted(vocab, key=vocab.get)
    tokens = tokens[:4] + tokens[4:][::-1]
    return tiny_tokenizer({t: i for i, t in enumerate(tokens)})


def pad_dominant(model):
    """Makes the padded rows (ids >= 300) win every step: the final norm keeps only hidden dimension 0 and
    the padded rows are +-1000 along it, so a sampler or argmax that sees them picks one of them."""
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        head = model.lm_head.weight
        head[VOCAB_SIZE:] = 0.0
        head[VOCAB_SIZE::2, 0] = 1000.0
        head[VOCAB_SIZE + 1 :: 2, 0] = -1000.0
    return model


def save(directory: Path, model, tokenizer=None) -> str:
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tok = tiny_tokenizer()
    return {
        "root": root,
        "teacher": save(root / "teacher", tiny_teacher(max_positions=64), tok),
        "student": save(root / "student", tiny_student(max_positions=64), tok),
        "other_teacher": save(root / "other_teacher", tiny_teacher(max_positions=64), other_tokenizer()),
        "bare_teacher": save(root / "bare_teacher", tiny_teacher(max_positions=64)),
        "bare_student": save(root / "bare_student", tiny_student(max_positions=64)),
        "padded_teacher": save(
            root / "padded_teacher", pad_dominant(tiny_teacher(vocab_size=PADDED, max_positions=64)), tok
        ),
        "padded_student": save(
            root / "padded_student", pad_dominant(tiny_student(vocab_size=PADDED, max_positions=64)), tok
        ),
        "train": write_jsonl(root / "train.jsonl", rows(4)),
        "test": write_jsonl(root / "test.jsonl", rows(3)),
    }


@pytest.fixture
def no_model_loading(monkeypatch):
    """Records any model load by the CLI: the tokenizer checks come before them."""
    loaded = []
    monkeypatch.setattr(cli, "load_model", lambda option, path: loaded.append(option) or 1 / 0)
    return loaded


@pytest.fixture
def generated(monkeypatch):
    """Every GenerationOutput of adaswitch.generate (the CLI and the Distiller import it at call time)."""
    outputs = []
    original = generate_module.generate

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append(out)
        return out

    monkeypatch.setattr(generate_module, "generate", recording)
    return outputs


def make_trainer(tmp_path, **kw):
    """`tiny_distiller` with this file's budget (8 new tokens, 1 step)."""
    return tiny_distiller(tmp_path, **{"max_new_tokens": 8, "max_steps": 1, **kw})


# ---------------------------------------------------------------------------------------------------
# different tokenizers


def test_vocabulary_difference_sees_same_size_and_special_ids():
    a, b = tiny_tokenizer(), other_tokenizer()
    assert len(a) == len(b) and (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (
        b.bos_token_id,
        b.eos_token_id,
        b.pad_token_id,
    )
    assert data.vocabulary_difference(a, tiny_tokenizer()) is None
    assert "296 shared tokens have different ids" in data.vocabulary_difference(a, b)


def test_distiller_refuses_different_tokenizers(tmp_path):
    with pytest.raises(ValueError) as info:
        make_trainer(tmp_path, teacher_tokenizer=other_tokenizer())
    message = str(info.value)
    for fragment in (
        "processing_class",
        "teacher_processing_class",
        type(tiny_tokenizer()).__name__,
        "different tokenizers",
        "same tokenizer",
        "cross-tokenizer distillation (aligning two vocabularies) is not supported",
    ):
        assert fragment in message, message
    assert not (tmp_path / "out").exists()


def test_distiller_compares_the_tokenizers_saved_with_the_models(dirs, tmp_path):
    """Models loaded from local directories: the tokenizers saved there are compared with processing_class."""
    with pytest.raises(ValueError) as info:
        make_trainer(
            tmp_path,
            student=AutoModelForCausalLM.from_pretrained(dirs["student"]).train(),
            teacher=AutoModelForCausalLM.from_pretrained(dirs["other_teacher"]),
            data=dirs["train"],
        )
    message = str(info.value)
    assert "the tokenizer saved with the teacher" in message and "other_teacher" in message, message
    assert "cross-tokenizer distillation (aligning two vocabularies) is not supported" in message
    assert not (tmp_path / "out").exists()


def test_cli_distill_refuses_different_tokenizers(dirs, tmp_path, capsys, no_model_loading):
    out = tmp_path / "out"
    code, _, err = run(
        [
            "distill",
            "--teacher",
            dirs["other_teacher"],
            "--student",
            dirs["student"],
            "--train",
            dirs["train"],
            "--output-dir",
            out,
            "--max-steps",
            "1",
            "--use-cpu",
        ],
        capsys,
    )
    assert_one_line_error(
        code,
        err,
        "the --student tokenizer",
        "the --teacher tokenizer",
        dirs["student"],
        dirs["other_teacher"],
        "different tokenizers",
        "cross-tokenizer distillation (aligning two vocabularies) is not supported",
    )
    assert no_model_loading == [] and not out.exists()


def test_cli_generate_refuses_different_tokenizers(dirs, capsys, no_model_loading):
    code, out, err = run(
        ["generate", "--teacher", dirs["other_teacher"], "--student", dirs["student"], "--prompt", "the cat"],
        capsys,
    )
    assert_one_line_error(code, err, dirs["student"], dirs["other_teacher"], "different tokenizers")
    assert no_model_loading == [] and out == ""


def test_cli_evaluate_refuses_different_tokenizers(dirs, tmp_path, capsys, no_model_loading):
    results = tmp_path / "res" / "results.json"
    code, _, err = run(
        [
            "evaluate",
            "--model",
            dirs["student"],
            "--teacher",
            dirs["other_teacher"],
            "--data",
            dirs["test"],
            "--output",
            results,
            "--no-progress",
        ],
        capsys,
    )
    assert_one_line_error(
        code, err, "the --model tokenizer", "the --teacher tokenizer", dirs["other_teacher"], "different tokenizers"
    )
    assert no_model_loading == [] and not results.parent.exists()


# ---------------------------------------------------------------------------------------------------
# a directory without a tokenizer


def test_directory_without_tokenizer_is_a_clear_error(dirs, tmp_path, capsys, no_model_loading):
    code, _, err = run(["evaluate", "--model", dirs["bare_teacher"], "--data", dirs["test"]], capsys)
    assert_one_line_error(code, err, "--model: no tokenizer in", dirs["bare_teacher"], "tokenizer.save_pretrained")
    out = tmp_path / "out"
    code, _, err = run(
        [
            "distill",
            "--teacher",
            dirs["bare_teacher"],
            "--student",
            dirs["bare_student"],
            "--train",
            dirs["train"],
            "--output-dir",
            out,
            "--use-cpu",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "no tokenizer in --student", dirs["bare_student"], dirs["bare_teacher"])
    code, _, err = run(
        ["generate", "--teacher", dirs["bare_teacher"], "--student", dirs["bare_student"], "--prompt", "a"], capsys
    )
    assert_one_line_error(code, err, "no tokenizer in --teacher", dirs["bare_teacher"], dirs["bare_student"])
    with pytest.raises(ValueError, match="no tokenizer in .*bare_teacher.*tokenizer.json"):
        data.load_tokenizer(dirs["bare_teacher"], name="teacher")
    config_only = Path(save(tmp_path / "config_only", tiny_teacher(max_positions=64)))
    (config_only / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    with pytest.raises(ValueError, match="the tokenizer in .*config_only.* is empty"):
        data.load_tokenizer(config_only, name="teacher")
    assert no_model_loading == [] and not out.exists()


# ---------------------------------------------------------------------------------------------------
# embedding matrices padded past the tokenizer


def test_generate_with_tokenizer_never_samples_padded_ids():
    tok = tiny_tokenizer()
    student, teacher = (pad_dominant(m(vocab_size=PADDED, max_positions=64)) for m in (tiny_student, tiny_teacher))
    for m in (student, teacher):  # eos / pad come from the tokenizer
        m.config.eos_token_id = m.config.pad_token_id = None
    batch = tok(["the cat sat on", "what is two plus two"], return_tensors="pt", padding=True)
    out = generate_module.generate(
        student,
        teacher,
        batch["input_ids"],
        batch["attention_mask"],
        policy=Student(),
        max_new_tokens=16,
        tokenizer=tok,
    )
    assert int(out.response.max()) < VOCAB_SIZE and int(out.lengths.sum()) > 0
    with pytest.raises(ValueError, match="vocab_size=320 exceeds the tokenizer's 300 tokens"):
        generate_module.generate(
            student,
            teacher,
            batch["input_ids"],
            batch["attention_mask"],
            policy=Student(),
            tokenizer=tok,
            vocab_size=PADDED,
        )


@pytest.mark.parametrize("policy", ["student", "teacher"])
def test_distiller_padded_pair_samples_only_tokens(dirs, tmp_path, policy):
    trainer = make_trainer(
        tmp_path,
        student=AutoModelForCausalLM.from_pretrained(dirs["padded_student"]).train(),
        teacher=AutoModelForCausalLM.from_pretrained(dirs["padded_teacher"]),
        data=dirs["train"],
        policy=policy,
        max_new_tokens=12,
    )
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids, valid, *_ = trainer._responses(trainer.model, batch)
    assert int(valid.sum()) > 0 and int(ids.max()) < VOCAB_SIZE, ids
    assert trainer.vocab_size == VOCAB_SIZE  # what the loss cuts the logits to


@pytest.mark.parametrize("fused", [True, False])
def test_distiller_loss_ignores_padded_rows(tmp_path, monkeypatch, fused):
    """The loss equals the loss with the padded rows changed: only the tokenizer's 300 logits weigh."""
    monkeypatch.setattr(Distiller, "_use_fused", lambda self, model: fused)
    student = tiny_student(vocab_size=PADDED, max_positions=64).train()
    teacher = tiny_teacher(vocab_size=PADDED, max_positions=64)
    trainer = make_trainer(tmp_path, student=student, teacher=teacher, policy="dataset")
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    before = trainer.compute_loss(trainer.model, batch).item()
    with torch.no_grad():
        for m in (student, teacher):
            m.lm_head.weight[VOCAB_SIZE:].normal_(0, 5.0)
    after = trainer.compute_loss(trainer.model, batch).item()
    assert after == pytest.approx(before, rel=1e-5, abs=1e-6)


def test_cli_generate_and_distill_padded_pair_sample_only_tokens(dirs, tmp_path, capsys, generated):
    code, out, err = run(
        [
            "generate",
            "--teacher",
            dirs["padded_teacher"],
            "--student",
            dirs["padded_student"],
            "--prompt",
            "what is two plus two",
            "--prompt",
            "the cat sat on",
            "--policy",
            "student",
            "--max-new-tokens",
            "12",
            "--color",
            "never",
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(
        [
            "distill",
            "--teacher",
            dirs["padded_teacher"],
            "--student",
            dirs["padded_student"],
            "--train",
            dirs["train"],
            "--output-dir",
            tmp_path / "out",
            "--policy",
            "teacher",
            "--max-steps",
            "1",
            "--per-device-train-batch-size",
            "2",
            "--max-new-tokens",
            "8",
            "--use-cpu",
            "--save-steps",
            "100",
            "--set",
            "disable_tqdm=true",
        ],
        capsys,
    )
    assert code == 0, err
    assert len(generated) >= 2
    for g in generated:
        valid = g.attention_mask[:, g.prompt_length :].bool()
        assert int(valid.sum()) > 0 and int(g.response.max()) < VOCAB_SIZE, g.response


def test_evaluate_padded_model_generates_and_scores_only_tokens(dirs, tmp_path, capsys, monkeypatch):
    generations = []
    original = GenerationMixin.generate

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        generations.append(out)
        return out

    monkeypatch.setattr(GenerationMixin, "generate", recording)
    results = tmp_path / "results.json"
    code, _, err = run(
        [
            "evaluate",
            "--model",
            dirs["padded_student"],
            "--teacher",
            dirs["padded_teacher"],
            "--data",
            dirs["test"],
            "--max-new-tokens",
            "6",
            "--output",
            results,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    prompt_width = max(len(tiny_tokenizer()(r["prompt"])["input_ids"]) for r in rows(3))
    assert generations and all(int(g[:, prompt_width:].max()) < VOCAB_SIZE for g in generations)
    # the teacher-forced KL does not change with the padded rows
    model = AutoModelForCausalLM.from_pretrained(dirs["padded_student"])
    teacher = AutoModelForCausalLM.from_pretrained(dirs["padded_teacher"])
    tok = tiny_tokenizer()
    kl = evaluate(model, tok, dirs["test"], teacher=teacher, max_new_tokens=2, progress=False)["teacher_kl"]
    assert kl == pytest.approx(json.loads(results.read_text())["teacher_kl"], rel=1e-5)
    with torch.no_grad():
        model.lm_head.weight[VOCAB_SIZE:].normal_(0, 50.0)
    again = evaluate(model, tok, dirs["test"], teacher=teacher, max_new_tokens=2, progress=False)["teacher_kl"]
    assert again == pytest.approx(kl, rel=1e-5)
