"""Seconds per distillation step for every policy on the demo models and budget, split into generation /
teacher forward (loss) / student forward + backward + optimizer, with teacher forwards per response token
and host syncs, plus TRL's `DistillationTrainer` (on-policy, same models, prompts, batch, max new tokens,
CPU, no vLLM) as the peer, and a measured floor: the same work as raw model forwards. Everything is timed
in the same run, configurations interleaved over rounds; ratios are what to read (the machine is shared and
noisy). Writes benchmarks/results/distill_step_cpu.{csv,md} (or --out).

    python benchmarks/bench_distill_step.py [--pair demo|real|deep] [--rounds 2] [--steps 3] [--batch B]
                                            [--max-new-tokens N] [--only "On-policy;SKD, G=0"] [--no-trl]
                                            [--out PATH]

The configurations: on-policy; per policy (AdaSwitch, SKD, SeqKD) every fixed draft length G in {0, 2, 4, 8}
with step guidance and (AdaSwitch, SeqKD) speculative guidance, and "auto" (the defaults, lookahead="auto" and
guidance="auto"; its stats carry from the warm-up step into the timed ones, as in a run); a section compares
auto with the fastest fixed setting of each policy.

Pairs: "demo" (default): the demo's shipped teacher (Qwen2-style) and the quick preset's shipped start student
(Llama-style, assets/student_quick), the demo task's training prompts, the quick preset's budget (batch 32,
40 new tokens, forward KL, SKD top-k 2); writes distill_step_cpu. "real": SmolLM2-135M-Instruct and its
pruned, healed 12-layer student (adaswitch.demo.build_real, built once), the real task's chat training
prompts, batch 8, 16 new tokens, SKD top-k 25; writes distill_step_real_cpu. "deep": the demo pair with the
teacher deepened to 16 layers by identity layers (`deep_teacher`: same logits, a forward at least 8x a student
one; the last line of the report gives the measured ratio), the demo's budget; writes distill_step_deep_cpu.
The prompts are the same for
every configuration. Per configuration and round: a fresh copy of the student,
one warm-up step, then --steps timed steps; the table holds medians over all timed steps. Columns:

- generation: `adaswitch.generate` inside the step (Distiller's own timer);
- teacher fwd (loss): the loss's teacher forward (0 when the teacher states from generation are reused);
- student fwd+bwd+opt: the rest of the step (the student's forward and backward, the optimizer, metrics);
- mean G: the mean draft length over the decode iterations (Distiller's `mean_lookahead`);
- student fwd / token: batched calls of the student's decoder in generation per response token of a row;
- teacher fwd / token: batched calls of the teacher's decoder (prefill, decode, verification and the loss's
  forward) per response token of a row (calls x batch / response tokens). A batch keeps decoding until
  its longest row is done, so every call counts all its rows, finished ones included;
- teacher fwd / token (live rows): the same calls, each counting only the rows still live in it (not
  finished, below max_new_tokens: the engine's own idle mask, read by a wrapper around its teacher decode
  forward and summed after the run, so no host read enters the loop); the prompt's prefill and the loss's
  forward count every row, since every row needs them. 1.00 means one teacher forward per response token,
  the least a teacher that writes or scores every token can take;
- host syncs / step: device-to-host reads in one compute_loss (generation, loss, metrics), counted by
  adaswitch.engine.sync.SyncCounter in an extra, untimed step.

Floor (rows "floor: <configuration>", once per round after the configurations, on the same prompt
batches as their timed steps): the least time any batched implementation could take for the same step on
this machine. Generation is replaced by raw batched forwards of the models with transformers' own DynamicCache
(a prefill of the prompt that gives the logits of response position 0, then one-token forwards; no engine,
no rule, no sampling; the inputs are fixed random ids, since a forward's cost does not depend on them),
each model run for as many response positions as the configuration's own outputs need: the longest row
(every row of a batch decodes until the longest is done); AdaSwitch's student only until the last row's
switch (or the end of a row that never switched), its teacher at every position (the rule reads its
logits before the switch, it writes every token after); SKD both models at every position; SeqKD the teacher only;
on-policy the student only. The step floor adds that step's measured training part (student
fwd+bwd+opt, and the loss's teacher forward where the states are not reused). The engine's own forward
counts (which run to its next host read after the last switch / finish) are in the CSV beside the floor's.
"floor: student decode" / "floor: teacher decode": each model alone over on-policy's positions (their ratio
is what a teacher forward costs against a student one here). Reported: ours / floor per configuration
(the engine's overhead) and the floor's step against the on-policy floor (what any implementation pays).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import importlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine_info import cpu_model, git_commit, load_average, utc_now, versions_text
from transformers import TrainerCallback

RESULTS = Path(__file__).resolve().parent / "results"
SKD_TOP_K = 2  # the demo's
# the deep pair's teacher: the demo teacher's 3 layers and 13 identity layers (about 11x a student forward)
DEEP_LAYERS = 16
PAIRS = {  # name: (SKD top-k, batch, max new tokens, output name, title)
    "demo": (SKD_TOP_K, 32, 40, "distill_step_cpu", "demo models, quick-preset budget"),
    "real": (25, 8, 16, "distill_step_real_cpu", "SmolLM2-135M-Instruct and its 12-layer student, chat prompts"),
    "deep": (SKD_TOP_K, 32, 40, "distill_step_deep_cpu",
             f"demo models with a {DEEP_LAYERS}-layer teacher (the demo teacher and identity layers), quick-preset "
             "budget"),
}
GRID = (0, 2, 4, 8)  # the fixed draft lengths timed beside lookahead="auto"

# name -> DistillConfig overrides: every fixed G with and without speculative guidance where the policy has it
# (SKD's blocks verify by its own rule; SeqKD's blocks exist only as verified drafts), next to "auto" (the
# defaults: lookahead="auto", guidance="auto", step mode's tokens whatever it picks) and "auto speculative"
# (lookahead="auto" with guidance="speculative": G picked among verified blocks, the teacher's distribution
# with other draws than step mode's, like the fixed speculative rows)
CONFIGS = {"On-policy": dict(policy="student")}
CONFIGS.update({f"AdaSwitch, G={g}": dict(policy="adaswitch", lookahead=g, guidance="step") for g in GRID})
CONFIGS.update({f"AdaSwitch, G={g} speculative": dict(policy="adaswitch", lookahead=g, guidance="speculative")
                for g in GRID[1:]})
CONFIGS["AdaSwitch, auto"] = dict(policy="adaswitch")
CONFIGS["AdaSwitch, auto speculative"] = dict(policy="adaswitch", guidance="speculative")
CONFIGS.update({f"SKD, G={g}": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=g) for g in GRID})
CONFIGS["SKD, auto"] = dict(policy="skd", skd_top_k=SKD_TOP_K)
CONFIGS["SeqKD (teacher), G=0"] = dict(policy="teacher", lookahead=0, guidance="step")
CONFIGS.update({f"SeqKD (teacher), G={g} speculative": dict(policy="teacher", lookahead=g, guidance="speculative")
                for g in GRID[1:]})
CONFIGS["SeqKD (teacher), auto"] = dict(policy="teacher")
CONFIGS["SeqKD (teacher), auto speculative"] = dict(policy="teacher", guidance="speculative")
POLICIES = ("AdaSwitch", "SKD", "SeqKD (teacher)")  # configuration name prefixes with a grid and an auto row
TRL = "TRL DistillationTrainer (on-policy)"
# configurations that get a floor row ("floor: <name>"), from their own outputs and training parts
FLOORS = ("On-policy", "AdaSwitch, G=0", "SKD, G=0", "SeqKD (teacher), G=0")
FLOOR = "floor"  # the round's raw-forward measurement, run after the configurations
STUDENT_DECODE, TEACHER_DECODE = "floor: student decode", "floor: teacher decode"


def deep_teacher(teacher, layers: int = DEEP_LAYERS):
    """The teacher with identity layers appended up to `layers`: copies of its last layer whose attention output
    and MLP down projections are zero, so each adds its full compute and nothing to the residual stream (the
    logits are the teacher's, so are the acceptance rates: only the cost per forward changes)."""
    deep = copy.deepcopy(teacher)
    stack = deep.model.layers
    for i in range(len(stack), layers):
        layer = copy.deepcopy(stack[-1])
        layer.self_attn.layer_idx = i
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            torch.nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                torch.nn.init.zeros_(proj.bias)
        stack.append(layer)
    deep.config.num_hidden_layers = layers
    if getattr(deep.config, "layer_types", None):
        deep.config.layer_types = list(deep.config.layer_types) + [deep.config.layer_types[-1]] * (
            layers - len(deep.config.layer_types))
    return deep


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class Counter:
    """Calls of a module's forward (a forward pre-hook)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model


@contextlib.contextmanager
def live_teacher_rows():
    """Rows still live (not finished, below max_new_tokens) at each of the engine's teacher decode forwards:
    a list of 0-d tensors, read after the run (no host read inside the loop)."""
    engine = importlib.import_module("adaswitch.engine.generate")  # the module (the package exports the function)
    original, live = engine._Run._teacher_forward, []

    def counted(run, ids):
        live.append((~run._idle()).sum())
        return original(run, ids)

    engine._Run._teacher_forward = counted
    try:
        yield live
    finally:
        engine._Run._teacher_forward = original


def positions_needed(policy, lengths: torch.Tensor, switch_position: torch.Tensor) -> tuple[int, int]:
    """(student, teacher) response positions whose logits the policy's rule reads in a batch decoded until its
    longest row is done: AdaSwitch's student until the last row's switch (a row that never switched: its
    end), every other model that runs at every position."""
    from adaswitch.policies import AdaSwitch

    longest = int(lengths.max())
    teacher = longest if policy.uses_teacher else 0
    if isinstance(policy, AdaSwitch):
        student = int(torch.where(switch_position >= 0, switch_position + 1, lengths).max())
    else:
        student = longest if policy.uses_student else 0
    return student, teacher


def run_adaswitch(name, overrides, teacher, student, tokenizer, pool, args, out_dir):
    from adaswitch.engine.sync import SyncCounter
    from adaswitch.train.config import DistillConfig
    from adaswitch.train.distiller import Distiller

    steps = args.steps + 1
    config = DistillConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        max_grad_norm=1.0, max_new_tokens=args.max_new_tokens, seed=0, data_seed=0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        **overrides,
    )
    trainer = Distiller(model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=pool,
                        processing_class=tokenizer)
    teacher_seconds = []
    forward = trainer._forward

    def timed_forward(model, *a, **kw):
        if model is not trainer.teacher_model:
            return forward(model, *a, **kw)
        start = time.perf_counter()
        out = forward(model, *a, **kw)
        teacher_seconds[-1] += time.perf_counter() - start
        return out

    trainer._forward = timed_forward
    timer = StepTimer()
    trainer.add_callback(timer)
    begin = timer.on_step_begin

    def step_begin(*a, **kw):
        teacher_seconds.append(0.0)
        begin(*a, **kw)

    timer.on_step_begin = step_begin
    counter, student_counter = Counter(_decoder(teacher)), Counter(_decoder(trainer.model))
    generations = []  # per step: its prompts, outputs and the forwards generation ran
    responses = trainer._responses

    def logged(model, inputs):
        before = student_counter.calls, counter.calls
        out = responses(model, inputs)
        gen = out[4]
        generations.append(dict(
            prompt=(inputs["prompt_input_ids"], inputs["prompt_attention_mask"]),
            lengths=gen.lengths.clone(), switch_position=gen.switch_position.clone(),
            forwards=(student_counter.calls - before[0], counter.calls - before[1])))
        return out

    trainer._responses = logged
    try:
        with live_teacher_rows() as live:
            trainer.train()
    finally:
        counter.handle.remove()
        student_counter.handle.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    gen = [h["generation_seconds"] for h in logs]
    tokens = sum(h["response_tokens"] for h in logs)
    step_teacher, calls = list(teacher_seconds), counter.calls  # before the extra step
    # every teacher call counts its live rows: the engine's decode forwards their own, the others all rows
    live_rows = sum(int(x) for x in live) + (calls - len(live)) * args.batch
    # the extra step: host reads of one compute_loss
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with SyncCounter() as sync:
        trainer.compute_loss(trainer.model, batch)
    rows = []
    for i in range(1, steps):  # step 0 is the warm-up
        total, g = timer.seconds[i], generations[i]
        rows.append(dict(total=total, generation=gen[i], teacher=step_teacher[i],
                         student=total - gen[i] - step_teacher[i], prompt=g["prompt"], lengths=g["lengths"],
                         positions=positions_needed(trainer.policy, g["lengths"], g["switch_position"]),
                         forwards=g["forwards"]))
    student_calls = sum(g["forwards"][0] for g in generations[1:])  # generation's, timed steps
    timed_tokens = sum(h["response_tokens"] for h in logs[1:])
    extra = dict(teacher_forwards_per_token=calls * args.batch / max(tokens, 1),
                 student_forwards_per_token=student_calls * args.batch / max(timed_tokens, 1),
                 mean_lookahead=statistics.mean(h.get("mean_lookahead", 0.0) for h in logs[1:]),
                 teacher_forwards_per_token_live=live_rows / max(tokens, 1), host_syncs=sync.count,
                 teacher_token_fraction=statistics.mean(h.get("teacher_token_fraction", 0.0) for h in logs),
                 reused=statistics.mean(h.get("teacher_states_reused", 0.0) for h in logs),
                 lookahead=config.lookahead, guidance=config.guidance)
    return rows, extra


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, mask: torch.Tensor, positions: int, seed: int) -> list[float]:
    """Cumulative seconds until the logits of response positions 0 .. positions - 1 of the left-padded prompt
    batch: one prefill (logits of the last column only), then one-token forwards with transformers'
    DynamicCache and a growing 2-D mask, as a plain decode loop without any rule does. Inputs: random ids."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()
    try:
        vocab = model.config.get_text_config(decoder=True).vocab_size
        inputs = torch.randint(0, vocab, (ids.shape[0], positions), generator=torch.Generator().manual_seed(seed))
        cache = DynamicCache(config=model.config)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        ones = torch.ones_like(mask[:, :1])
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True,
              logits_to_keep=1)
        seconds = [time.perf_counter() - start]
        position_ids = position_ids[:, -1:]
        for j in range(1, positions):
            mask = torch.cat([mask, ones], 1)
            position_ids = position_ids + 1
            model(input_ids=inputs[:, j - 1 : j], attention_mask=mask, position_ids=position_ids, cache=cache,
                  use_cache=True)
            seconds.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return seconds


def run_floor(round_rows: dict, teacher, student, args) -> dict:
    """Floor rows of one round: per timed step, both models' raw decode over the step's prompt batch (once,
    shared by every configuration), each configuration's generation floor read at its positions needed."""
    names = [n for n in FLOORS if n in round_rows]
    first = round_rows[names[0]]
    for name in names[1:]:  # the Distiller's data order is seeded: every configuration sees the same batches
        for a, b in zip(first, round_rows[name]):
            if not (torch.equal(a["prompt"][0], b["prompt"][0]) and torch.equal(a["prompt"][1], b["prompt"][1])):
                raise RuntimeError(f"{name!r} got other prompt batches than {names[0]!r}: the floor needs the same")
    out = {f"floor: {n}": [] for n in names}
    out.update({STUDENT_DECODE: [], TEACHER_DECODE: []} if "On-policy" in names else {})
    for i, step in enumerate(first):
        ids, mask = step["prompt"]
        s = decode_seconds(student, ids, mask, args.max_new_tokens, seed=i)
        t = decode_seconds(teacher, ids, mask, args.max_new_tokens, seed=i)
        for name in names:
            row = round_rows[name][i]
            c_s, c_t = row["positions"]
            generation = (s[c_s - 1] if c_s else 0.0) + (t[c_t - 1] if c_t else 0.0)
            out[f"floor: {name}"].append(dict(
                total=generation + row["teacher"] + row["student"], generation=generation, teacher=row["teacher"],
                student=row["student"], positions=row["positions"], forwards=row["positions"],
                lengths=row["lengths"], loss_forward=row["teacher"] > 0))
        if "On-policy" in names:
            on_policy = round_rows["On-policy"][i]
            c, nan = on_policy["positions"][0], float("nan")
            for key, seconds, forwards in ((STUDENT_DECODE, s, (c, 0)), (TEACHER_DECODE, t, (0, c))):
                out[key].append(dict(total=nan, generation=seconds[c - 1], teacher=nan, student=nan,
                                     positions=forwards, forwards=forwards, lengths=on_policy["lengths"],
                                     loss_forward=False))
    return out


def floor_extra(rows: list, batch: int, engine_extra: dict | None) -> dict:
    """The floor's teacher forwards per response token (all rows / live rows) from its positions, and the
    engine configuration's token and reuse columns."""
    tokens = sum(int(r["lengths"].sum()) for r in rows)
    calls = sum(r["positions"][1] + r["loss_forward"] for r in rows)
    live = sum(int(r["lengths"].clamp(max=r["positions"][1]).sum()) + r["loss_forward"] * batch for r in rows)
    e = engine_extra or {}
    student = sum(r["positions"][0] for r in rows)
    return dict(teacher_forwards_per_token=calls * batch / max(tokens, 1),
                student_forwards_per_token=student * batch / max(tokens, 1), mean_lookahead=0.0,
                teacher_forwards_per_token_live=live / max(tokens, 1), host_syncs=float("nan"),
                teacher_token_fraction=e.get("teacher_token_fraction", float("nan")),
                reused=e.get("reused", float("nan")), lookahead=0, guidance="-")


def run_trl(teacher, student, tokenizer, pool, args, out_dir):
    from trl import DistillationConfig, DistillationTrainer

    from adaswitch.engine.sync import SyncCounter

    steps = args.steps + 1
    config = DistillationConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        max_grad_norm=1.0, max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0, seed=0,
        data_seed=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, use_vllm=False,
    )
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=config,
                                  train_dataset=pool.select_columns(["prompt"]), processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    counter = Counter(_decoder(teacher))
    tokens = []
    generate = trainer.model.generate if hasattr(trainer.model, "generate") else None
    gen_seconds = []

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        gen_seconds.append(time.perf_counter() - start)
        tokens.append(int((out[:, kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]:]
                           != tokenizer.pad_token_id).sum()))
        return out

    if generate is not None:
        trainer.model.generate = timed_generate
    try:
        with SyncCounter() as sync:
            trainer.train()
    finally:
        counter.handle.remove()
    rows = []
    for i in range(1, steps):
        g = gen_seconds[i] if len(gen_seconds) == steps else float("nan")
        rows.append(dict(total=timer.seconds[i], generation=g, teacher=float("nan"),
                         student=timer.seconds[i] - g))
    per_token = counter.calls * args.batch / max(sum(tokens), 1) if tokens else float("nan")
    # TRL's teacher runs only in the loss, where every row needs it: the live-row count is the same
    extra = dict(teacher_forwards_per_token=per_token, teacher_forwards_per_token_live=per_token,
                 student_forwards_per_token=float("nan"), mean_lookahead=0.0,
                 host_syncs=sync.count / steps, teacher_token_fraction=0.0, reused=0.0, lookahead=0,
                 guidance="-")
    return rows, extra


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be an int >= 1, got {text!r}")
        return value
    return parse


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if value != value else f"{value:{spec}}{suffix}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS), default="demo")
    parser.add_argument("--rounds", type=_positive("--rounds"), default=2)
    parser.add_argument("--steps", type=_positive("--steps"), default=3)
    parser.add_argument("--batch", type=_positive("--batch"), default=None, help="default: the pair's (32; real 8)")
    parser.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=None,
                        help="default: the pair's (40; real 16)")
    parser.add_argument("--only", default=None, help="semicolon-separated configuration names (default: all)")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--out", default=None, help="output path without suffix: writes PATH.csv and PATH.md "
                        "(default: benchmarks/results/distill_step_cpu, or distill_step_real_cpu for --pair real)")
    args = parser.parse_args(argv)
    top_k, batch, new_tokens, out_name, title = PAIRS[args.pair]
    args.batch = batch if args.batch is None else args.batch
    args.max_new_tokens = new_tokens if args.max_new_tokens is None else args.max_new_tokens
    args.out = str(RESULTS / out_name) if args.out is None else args.out
    configs = {n: {**c, "skd_top_k": top_k} if "skd_top_k" in c else c for n, c in CONFIGS.items()}
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(";")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"--only: unknown configuration(s) {unknown}; expected names from {list(CONFIGS)}")

    from transformers.utils import logging as hf_logging

    from adaswitch.demo.build_teacher import QUICK_STUDENT_DIR, TEACHER_DIR, DataSpec, load_teacher

    hf_logging.set_verbosity_error()
    logging.getLogger("adaswitch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.pair == "real":
        from adaswitch.demo.build_real import ensure_pair, load_model, read_split

        built = ensure_pair()
        teacher, tokenizer = load_model(built.teacher)
        student, _ = load_model(built.student)
        train = read_split(built.data, "train").select_columns(["prompt", "completion"])
    else:
        teacher, tokenizer = load_teacher(TEACHER_DIR)
        student, _ = load_teacher(QUICK_STUDENT_DIR)  # the quick preset's start: what `make demo` distils
        train = DataSpec().build()["train"]
        if args.pair == "deep":
            teacher = deep_teacher(teacher)
    teacher.requires_grad_(False)
    student.train()
    if (args.steps + 2) * args.batch > len(train):
        parser.error(f"--steps / --batch: {(args.steps + 2) * args.batch} prompts needed, the pair has {len(train)}")
    pool = train.select(range((args.steps + 2) * args.batch))
    if not args.no_trl:
        names.append(TRL)
    floored = [n for n in FLOORS if n in names]
    if floored:
        names.append(FLOOR)
    load_before = load_average()
    results = {n: [] for n in names if n != FLOOR}
    extras = {}
    for r in range(args.rounds):
        this_round = {}
        for name in names:
            if name == FLOOR:
                for key, rows in run_floor(this_round, teacher, student, args).items():
                    results.setdefault(key, []).extend(rows)
                print(f"round {r} floor: " + ", ".join(
                    f"{n} {statistics.median(x['total'] for x in results[f'floor: {n}']):.3f}" for n in floored)
                    + " s/step", flush=True)
                continue
            with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp, contextlib.redirect_stdout(io.StringIO()):
                if name == TRL:
                    rows, extra = run_trl(teacher, student, tokenizer, pool, args, tmp)
                else:
                    rows, extra = run_adaswitch(name, configs[name], teacher, student, tokenizer, pool, args, tmp)
            results[name] += rows
            this_round[name] = rows
            extras[name] = extra
            med = statistics.median(x["total"] for x in rows)
            print(f"round {r} {name}: {med:.3f} s/step", flush=True)
    load_after = load_average()
    for key, rows in results.items():
        if key.startswith("floor: "):
            extras[key] = floor_extra(rows, args.batch, extras.get(key[len("floor: "):]))

    def med(name, key):
        vals = [x[key] for x in results.get(name, ()) if x[key] == x[key]]
        return statistics.median(vals) if vals else float("nan")

    def mean_forwards(name, which):
        rows = [x for x in results[name] if "forwards" in x]
        return statistics.mean(x["forwards"][which] for x in rows) if rows else float("nan")

    base, trl = med("On-policy", "total"), med(TRL, "total")
    base_floor = med("floor: On-policy", "total")
    table = []
    for name in results:
        e = extras[name]
        table.append(dict(
            config=name, lookahead=e["lookahead"], guidance=e["guidance"],
            seconds_per_step=med(name, "total"), generation=med(name, "generation"),
            teacher_forward_loss=med(name, "teacher"), student_fwd_bwd_opt=med(name, "student"),
            vs_on_policy=med(name, "total") / base, vs_trl=med(name, "total") / trl,
            vs_on_policy_floor=med(name, "total") / base_floor,
            teacher_forwards_per_token=e["teacher_forwards_per_token"],
            teacher_forwards_per_token_live=e["teacher_forwards_per_token_live"], host_syncs_per_step=e["host_syncs"],
            student_forwards_per_token=e["student_forwards_per_token"], mean_lookahead=e["mean_lookahead"],
            teacher_token_fraction=e["teacher_token_fraction"], teacher_states_reused=e["reused"],
            student_forwards_per_generation=mean_forwards(name, 0),
            teacher_forwards_per_generation=mean_forwards(name, 1),
        ))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    meta = (f"CPU: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}; commit "
            f"{git_commit()}; {utc_now()}; load average before {load_before}, after {load_after}. "
            f"Batch {args.batch}, max_new_tokens {args.max_new_tokens}, {args.rounds} rounds x {args.steps} timed "
            f"steps per configuration (medians). Packages: {versions_text()}.")
    meta += f" SKD top-k {top_k}."
    out.with_suffix(".md").write_text(markdown(table, meta, title))
    print(markdown(table, meta, title))


def auto_against_grid(table: list) -> list[dict]:
    """Per policy: "auto" against the fastest fixed setting that writes the same tokens (step guidance), and
    "auto speculative" against the fastest fixed speculative one."""
    rows = {t["config"]: t for t in table}
    out = []
    for policy, auto_name, speculative in ((p, f"{p}, auto{s}", bool(s)) for p in POLICIES
                                           for s in ("", " speculative")):
        fixed = [t for n, t in rows.items()
                 if n.startswith(policy + ", G=") and n.endswith(" speculative") == speculative]
        auto = rows.get(auto_name)
        if not fixed or auto is None:
            continue
        fastest = min(fixed, key=lambda t: float(t["seconds_per_step"]))
        out.append(dict(policy=auto_name, fastest=fastest["config"],
                        fastest_vs_on_policy=float(fastest["vs_on_policy"]),
                        auto_vs_on_policy=float(auto["vs_on_policy"]),
                        auto_over_fastest=float(auto["seconds_per_step"]) / float(fastest["seconds_per_step"]),
                        auto_mean_lookahead=float(auto["mean_lookahead"])))
    return out


def markdown(table: list, meta: str, title: str = PAIRS["demo"][4]) -> str:
    """The report: every configuration's step, then the floor section (ratios first)."""
    rows = {t["config"]: t for t in table}
    lines = [
        f"# Distillation step cost on CPU ({title})", "", meta, "",
        "Generated by `benchmarks/bench_distill_step.py`. Seconds are medians; ratios divide medians of the "
        "same run. TRL's row times its whole step (generation by `model.generate`; its other columns are "
        "not split). Teacher forwards per token count the teacher decoder's batched calls (prefill, decode, "
        "verification, the loss's forward) per response token of a row, every call with all its rows (a batch "
        "decodes until its longest row is done); \"live rows\" counts in each call only the rows still live "
        "(not finished, below max_new_tokens), so 1.00 is one teacher forward per response token. Host syncs "
        "are per compute_loss (TRL: per training step).", "",
        "| configuration | G | guidance | mean G | s / step | generation | teacher fwd (loss) | student fwd+bwd+opt "
        "| vs on-policy | vs TRL | student fwd / token | teacher fwd / token | teacher fwd / token (live rows) "
        "| host syncs / step | teacher tokens | states reused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        if t["config"].startswith("floor: "):
            continue
        lines.append(
            f"| {t['config']} | {t['lookahead']} | {t['guidance']} | {t['mean_lookahead']:.2f} | "
            f"{t['seconds_per_step']:.3f} | "
            f"{t['generation']:.3f} | {_fmt(t['teacher_forward_loss'], '.3f')} | {t['student_fwd_bwd_opt']:.3f} | "
            f"{_fmt(t['vs_on_policy'], '.2f', 'x')} | {_fmt(t['vs_trl'], '.2f', 'x')} | "
            f"{_fmt(t['student_forwards_per_token'], '.3f')} | {t['teacher_forwards_per_token']:.3f} | "
            f"{t['teacher_forwards_per_token_live']:.3f} | {t['host_syncs_per_step']:.0f} | "
            f"{t['teacher_token_fraction']:.2f} | {t['teacher_states_reused']:.0%} |"
        )
    best = auto_against_grid(table)
    if best:
        lines += [
            "", "## lookahead=\"auto\" against the fixed settings", "",
            "Per policy: the defaults (lookahead=\"auto\", guidance=\"auto\": step mode's tokens) against the "
            "fastest fixed G with step guidance (the same tokens), and lookahead=\"auto\" with "
            "guidance=\"speculative\" against the fastest fixed speculative G, each as a ratio to our on-policy "
            "step; \"auto / fastest\" is the target's measure (within 10%: at most 1.10x).", "",
            "| auto setting | fastest fixed setting | its step vs on-policy | auto vs on-policy | auto / fastest "
            "| auto's mean G |",
            "|---|---|---|---|---|---|",
        ]
        for b in best:
            lines.append(f"| {b['policy']} | {b['fastest']} | {b['fastest_vs_on_policy']:.2f}x | "
                         f"{b['auto_vs_on_policy']:.2f}x | {b['auto_over_fastest']:.2f}x | "
                         f"{b['auto_mean_lookahead']:.2f} |")
    floors = [n for n in FLOORS if f"floor: {n}" in rows and n in rows]
    if floors:
        lines += [
            "", "## Floor: the same work as raw forwards", "",
            "Each configuration's generation replaced by raw batched forwards of the models (transformers' "
            "DynamicCache, no engine, no rule), each model run for the response positions the configuration's "
            "own outputs need (the longest row; AdaSwitch's student until the last row's switch), plus the "
            "step's measured training part. \"ours / floor\" is what the engine adds; \"floor vs on-policy "
            "floor\" is what any implementation pays on this machine. Forwards per generation: batched "
            "forwards (prefill included), student / teacher: the engine's counted, the floor's needed.", "",
            "| configuration | step: ours / floor | generation: ours / floor | floor vs on-policy floor "
            "| ours vs our on-policy | forwards, ours | forwards, floor | floor teacher fwd / token (live rows) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in floors:
            ours, floor = rows[name], rows[f"floor: {name}"]
            lines.append(
                f"| {name} | {ours['seconds_per_step'] / floor['seconds_per_step']:.2f}x | "
                f"{ours['generation'] / floor['generation']:.2f}x | {_fmt(floor['vs_on_policy_floor'], '.2f', 'x')} | "
                f"{ours['vs_on_policy']:.2f}x | {ours['student_forwards_per_generation']:.1f} / "
                f"{ours['teacher_forwards_per_generation']:.1f} | {floor['student_forwards_per_generation']:.1f} / "
                f"{floor['teacher_forwards_per_generation']:.1f} | {floor['teacher_forwards_per_token_live']:.3f} |"
            )
        if STUDENT_DECODE in rows and TEACHER_DECODE in rows:
            s, t = rows[STUDENT_DECODE], rows[TEACHER_DECODE]
            lines += ["", f"Raw decode over on-policy's positions ({s['student_forwards_per_generation']:.1f} "
                      f"forwards on average): teacher / student = {t['generation'] / s['generation']:.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
