"""The Triton step kernels (interpreter on CPU) and the native CPU path against the PyTorch reference, and
fused_lookahead against sequential fused_step calls on every backend (docs/spec.md section 6: same tokens on
every backend and mode)."""

import math
import os
import subprocess
import sys

import pytest
import torch

from adaswitch._backend import native_available, native_ops
from adaswitch._validation import KINDS
from adaswitch.ops import SwitchState, fused_lookahead, fused_step, rng
from adaswitch.policies import SKD, AdaSwitch, FixedSwitch, Mixed, RandomSwitch, Sampling, Student, Teacher

EOS, PAD = 4, 0
NO_NATIVE = not (native_available() and hasattr(native_ops(), "gumbel_argmax"))
NATIVE = pytest.param("native", marks=pytest.mark.skipif(NO_NATIVE, reason="adaswitch._C not built"))
FAST = ["triton", NATIVE]  # the implementations checked against the reference


def random_logits(n, batch, vocab, dtype, masked=True):
    """Student and teacher logits [n, B, V]: a shared masked tail, scattered -inf, one peaked row."""
    s, t = (torch.randn(2, n, batch, vocab) * 2).unbind(0)
    if masked:
        s[..., vocab - 3:] = t[..., vocab - 3:] = -math.inf  # padded vocabulary
        t[:, 0, 7] = -math.inf  # teacher-only -inf: forward KL stays finite
        s[:, 1, ::5] = s[:, 1, ::5] - 4.0
    t[:, -1] *= 6  # a confident teacher row
    return s.to(dtype), t.to(dtype)


POLICIES = [
    Student(Sampling(0.7, top_p=0.8)),
    Teacher(Sampling(1.3, top_k=6)),
    Mixed(0.5, Sampling(0)),
    SKD(top_k=4, student_sampling=Sampling(0.5, top_p=0.5), teacher_sampling=Sampling(0.2, top_p=0.5)),
    *[AdaSwitch(window=2, k=1.15, divergence=kind, beta=0.3, alpha=0.2, divergence_temperature=1.5,
                teacher_sampling=Sampling(0))
      for kind in KINDS],
    AdaSwitch(window=3, k=1.1, warmup=4, min_divergence=0.2, divergence="jsd", beta=0.0),
    AdaSwitch(window=3, k=4.0, max_divergence=0.8),
    RandomSwitch(window=2, positions=(0, 2, 4, -1), divergence="tvd"),
]


def run_both(policy, s, t, impl):
    """Step the reference and `impl` through the positions; return their per-position outputs and states."""
    n, batch = s.shape[:2]
    window = policy.window if isinstance(policy, AdaSwitch) else 1
    results = {}
    for which in ("torch", impl):
        state = SwitchState.new(batch, window)
        keys = torch.arange(batch) * 3
        outs = [fused_step(s[i], t[i], policy, state, seed=17, keys=keys, position=torch.full((batch,), i),
                           eos_token_id=EOS, pad_token_id=PAD, impl=which)
                for i in range(n)]
        results[which if which == "torch" else "fast"] = outs, state
    return results


def assert_same(results):
    (ref_outs, ref_state), (tri_outs, tri_state) = results["torch"], results["fast"]
    for a, b in zip(ref_outs, tri_outs):
        assert torch.equal(a.token, b.token)
        assert torch.equal(a.from_teacher, b.from_teacher)
        assert torch.allclose(a.divergence, b.divergence, rtol=1e-5, atol=1e-5, equal_nan=True)
    for name in ("count", "switched", "switch_pos", "finished"):
        assert torch.equal(getattr(ref_state, name), getattr(tri_state, name)), name
    assert torch.allclose(ref_state.window, tri_state.window, rtol=1e-5, atol=1e-5)


SPIKES = [2, 3, 5, 6, None]  # per row: the position where the student departs from the teacher (None: never)


def switching_logits(n=8, vocab=97):
    """Student and teacher logits [n, B, V] under which decisions differ by row and position: each row's
    teacher is the same at every position and its student stays close to it (the same small, constant
    divergence, so no switch and SKD keeps the drafts) up to the row's SPIKES position, from which on the
    student is unrelated to the teacher (a divergence many times the usual: a switch once the row is
    eligible, and SKD rejections). Carries the masked tail, a teacher-only -inf and a shifted student row
    as well."""
    gen = torch.Generator().manual_seed(5)
    batch = len(SPIKES)
    t0 = torch.randn(batch, vocab, generator=gen) * 2
    # three likely tokens per row, about equally likely (a confident teacher; top-k / top-p bite, and a
    # student close to it drafts each of the teacher's ranks 0-2)
    t0[:, vocab - 6:vocab - 3] = 8.0 + 0.3 * torch.randn(batch, 3, generator=gen)
    s0 = t0 + 0.3 * torch.randn(batch, vocab, generator=gen)
    s0[1, ::5] -= 0.5
    departed = 3.0 * torch.randn(batch, vocab, generator=gen)
    s, t = s0.repeat(n, 1, 1), t0.repeat(n, 1, 1)
    for row, pos in enumerate(SPIKES):
        if pos is not None:
            s[pos:, row] = departed[row]
    s[..., vocab - 3:] = t[..., vocab - 3:] = -math.inf  # padded vocabulary
    t[:, 0, 7] = -math.inf  # teacher-only -inf: forward KL stays finite
    s[..., EOS] = t[..., EOS] = -30.0  # EOS (almost) never drawn: rows stay live up to their spike
    return s, t


SKD_BOUNDARY = SKD(top_k=2)  # on switching_logits, drafts land on the teacher's ranks 0-2: the boundary decides


@pytest.mark.parametrize("policy", [*POLICIES, SKD_BOUNDARY],
                         ids=lambda p: type(p).__name__ + str(getattr(p, "divergence", getattr(p, "top_k", ""))))
@pytest.mark.parametrize("impl", FAST)
def test_matches_reference_fp32(policy, impl):
    s, t = switching_logits()
    results = run_both(policy, s, t, impl)
    assert_same(results)
    # the inputs exercise the decision being compared: switches at different positions and a row that
    # never switches (AdaSwitch); drafts both kept and replaced (SKD)
    outs, state = results["torch"]
    if isinstance(policy, AdaSwitch):
        switched = state.switch_pos[state.switch_pos >= 0]
        assert len(set(switched.tolist())) >= 2 and (state.switch_pos == -1).any(), state.switch_pos
    if isinstance(policy, SKD):
        replaced = torch.stack([o.from_teacher for o in outs])
        assert 0.2 < replaced.float().mean() < 0.8, replaced.float().mean()


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_reference_half(dtype, impl):
    s, t = random_logits(5, 4, 130, dtype)
    for policy in (POLICIES[3], POLICIES[4], POLICIES[6]):
        assert_same(run_both(policy, s, t, impl))


@pytest.mark.parametrize("impl", FAST)
def test_multi_tile_rows(impl):
    """V above the kernels' 4096-wide tile (and 512-wide native block): argmax / log-sum-exp cross borders."""
    s, t = random_logits(3, 2, 4096 + 77, torch.float32)
    s[:, 0, 4100] = t[:, 0, 4100] = 30.0  # the maximum lives in the ragged second tile
    assert_same(run_both(AdaSwitch(window=1, k=1.05, divergence="jsd"), s, t, impl))
    assert_same(run_both(SKD(top_k=3), s, t, impl))


@pytest.mark.parametrize("impl", FAST)
def test_strided_rows(impl):
    s, t = random_logits(3, 3, 64, torch.float32, masked=False)
    wide_s = torch.zeros(3, 3, 80)
    wide_s[..., :64] = s
    assert_same(run_both(AdaSwitch(window=1, k=1.5), wide_s[..., :64], t, impl))


# ------------------------------------------------------------------------------------------- lookahead

def draft_tokens(s, policy, keys, position):
    batch, g, _ = s.shape
    return torch.stack([rng.sample(s[:, j], policy.student_sampling, seed=5, keys=keys,
                                   positions=position + j, stream=rng.STREAM_STUDENT)
                        for j in range(g)], 1)


def sequential(s, t, policy, state, keys, position):
    """What G fused_step calls give, row by row, stopping where the lookahead contract stops."""
    batch, g, _ = s.shape
    accepted, token, from_t = [], [], []
    div = torch.full((batch, g), math.nan)
    for b in range(batch):
        st = SwitchState(*(getattr(state, f)[b:b + 1].clone() for f in
                           ("window", "count", "switched", "switch_pos", "finished")))
        n, tok, ft = 0, PAD, False
        for j in range(g):
            if st.finished[0]:
                break
            o = fused_step(s[b:b + 1, j], t[b:b + 1, j], policy, st, seed=5, keys=keys[b:b + 1],
                           position=position[b:b + 1] + j, eos_token_id=EOS, pad_token_id=PAD, impl="torch")
            div[b, j] = o.divergence[0]
            if o.from_teacher[0]:
                tok, ft = int(o.token[0]), True
                break
            n += 1
        for f in ("window", "count", "switched", "switch_pos", "finished"):
            getattr(state, f)[b] = getattr(st, f)[0]
        accepted.append(n)
        token.append(tok)
        from_t.append(ft)
    return torch.tensor(accepted), torch.tensor(token), torch.tensor(from_t), div


def lookahead_setup(policy, batch=6, g=4, vocab=40):
    torch.manual_seed(3)
    s, t = (torch.randn(2, batch, g, vocab) * 2).unbind(0)
    keys = torch.arange(batch) + 100
    position = torch.tensor([0, 3, 5, 2, 7, 1])[:batch]
    window = policy.window if isinstance(policy, AdaSwitch) else 1
    state = SwitchState.new(batch, window)
    state.count[:] = torch.tensor([0, 3, 5, 2, 7, 1])[:batch]
    state.window.uniform_(0.5, 1.5)
    state.finished[2] = True
    state.switched[3] = True  # already switched: the teacher decides from draft index 0
    s[4, 1, EOS] = 50.0  # row 4 drafts EOS at index 1: it finishes there if it gets that far
    draft = draft_tokens(s, policy, keys, position)
    return s, t, draft, state, keys, position


LOOKAHEAD_POLICIES = [AdaSwitch(window=2, k=1.3), AdaSwitch(window=2, k=2.6), AdaSwitch(window=2, k=math.inf),
                      AdaSwitch(window=3, k=1.6, divergence="tvd"), AdaSwitch(window=2, k=9.0, max_divergence=1.5),
                      FixedSwitch(window=2, position=6), RandomSwitch(window=2, positions=(1, 4, 6, -1)),
                      SKD(top_k=8), Student(), Teacher()]


@pytest.mark.parametrize("impl", ["torch", *FAST])
@pytest.mark.parametrize("policy", LOOKAHEAD_POLICIES,
                         ids=lambda p: f"{type(p).__name__}{getattr(p, 'k', '')}{getattr(p, 'max_divergence', '')}")
def test_lookahead_equals_sequential_steps(policy, impl):
    s, t, draft, state, keys, position = lookahead_setup(policy)
    expected_state = SwitchState(*(getattr(state, f).clone() for f in
                                   ("window", "count", "switched", "switch_pos", "finished")))
    accepted, token, from_t, div = sequential(s, t, policy, expected_state, keys, position)
    out = fused_lookahead(s, t, draft, policy, state, seed=5, keys=keys, position=position, eos_token_id=EOS,
                          pad_token_id=PAD, impl=impl)
    assert torch.equal(out.accepted, accepted)
    assert torch.equal(out.token, token)
    assert torch.equal(out.from_teacher, from_t)
    assert torch.allclose(out.divergence, div, rtol=1e-5, atol=1e-5, equal_nan=True)
    for f in ("count", "switched", "switch_pos", "finished"):
        assert torch.equal(getattr(state, f), getattr(expected_state, f)), f
    assert torch.allclose(state.window, expected_state.window, rtol=1e-5, atol=1e-5)
    assert out.accepted[2] == 0 and out.token[2] == PAD  # finished before the call


def test_lookahead_scan_sees_switches_and_eos():
    """The setup above exercises what it claims: some rows switch mid-draft, one accepts all G."""
    policy = AdaSwitch(window=2, k=2.6)
    s, t, draft, state, keys, position = lookahead_setup(policy)
    out = fused_lookahead(s, t, draft, policy, state, seed=5, keys=keys, position=position, eos_token_id=EOS,
                          pad_token_id=PAD, impl="torch")
    assert out.from_teacher[3] and out.accepted[3] == 0
    switched_mid = (out.accepted > 0) & out.from_teacher
    assert switched_mid.any()
    assert (out.accepted == draft.shape[1]).any()
    s, t, draft, state, keys, position = lookahead_setup(Student())
    out = fused_lookahead(s, t, draft, Student(), state, seed=5, keys=keys, position=position,
                          eos_token_id=EOS, pad_token_id=PAD, impl="torch")
    assert draft[4, 1] == EOS and out.accepted[4] == 2 and state.finished[4] and not out.from_teacher[4]


_AOT_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from adaswitch.kernels.triton import step as k

def compile(fn, sig, consts, warps=8):
    sig = {**{n: t for n, t in (a.split(":") for a in sig.split())}, **{n: "constexpr" for n in consts}}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": warps, "enable_fp_fusion": False})
    assert out.asm["cubin"], (fn, consts)

STEP = ("S:*bf16 T:*bf16 stride_s:i64 stride_t:i64 V:i32 THR_S:*fp32 THR_T:*fp32 KEYS:*i64 POS:*i64 "
        "seed_hash:i64 WINDOW:*fp32 COUNT:*i64 SWITCHED:*i8 SWITCH_POS:*i64 FINISHED:*i8 SWITCH_AT:*i64 "
        "TOKEN:*i64 FROM_T:*i8 DIV:*fp32 inv_ts:fp32 inv_tt:fp32 inv_td:fp32 log_w:fp32 log_1mw:fp32 w:fp32 "
        "L:i32 min_hist:i32 k_bits:i64 f_bits:i64 a_bits:i64 skd_k:i32 eos:i32 pad:i32")
NAMES = ["CODE", "NEED_YS", "NEED_YT", "GREEDY_S", "GREEDY_T", "FILTER_S", "FILTER_T", "KIND", "SCHEDULED"]
for cfg in [(0, 1, 0, 0, 0, 1, 0, -1, 0), (1, 0, 1, 0, 1, 0, 0, -1, 0), (3, 1, 1, 0, 0, 1, 1, -1, 0),
            *[(4, 1, 1, 0, 0, 0, 0, kind, 0) for kind in range(6)], (4, 1, 1, 1, 1, 0, 0, 1, 0),
            (4, 1, 1, 0, 0, 0, 0, 0, 1), (4, 0, 1, 0, 0, 0, 0, -1, 0)]:
    consts = {**dict(zip(NAMES, cfg)), "PRECISE": True, "BLOCK": 4096, "BLOCK_L": 8}
    compile(k._fused_step_kernel, STEP, consts)

STATS = ("S:*bf16 T:*bf16 DRAFT:*i64 V:i32 G:i32 THR_T:*fp32 KEYS:*i64 POS:*i64 seed_hash:i64 YT:*i64 "
         "D:*fp32 KEEP:*i8 inv_tt:fp32 inv_td:fp32 log_w:fp32 log_1mw:fp32 w:fp32 skd_k:i32")
for greedy, filt, kind, rank in [(0, 1, 0, 0), (1, 0, 2, 0), (0, 0, -1, 2)]:
    compile(k._lookahead_stats_kernel, STATS, dict(GREEDY_T=greedy, FILTER_T=filt, KIND=kind, RANK=rank,
                                                   PRECISE=True, BLOCK=4096))
SCAN = ("DRAFT:*i64 YT:*i64 D:*fp32 KEEP:*i8 POS:*i64 G:i32 WINDOW:*fp32 COUNT:*i64 SWITCHED:*i8 "
        "SWITCH_POS:*i64 FINISHED:*i8 SWITCH_AT:*i64 ACCEPTED:*i64 TOKEN:*i64 FROM_T:*i8 DIV:*fp32 L:i32 "
        "min_hist:i32 k_bits:i64 f_bits:i64 a_bits:i64 eos:i32 pad:i32")
for code, scheduled in ((0, 0), (1, 0), (3, 0), (4, 0), (4, 1)):
    compile(k._lookahead_scan_kernel, SCAN, {"CODE": code, "BLOCK_L": 8, "SCHEDULED": scheduled}, warps=1)
compile(k._uniform_kernel, "KEYS:*i64 POS:*i64 OUT:*fp32 seed_hash:i64 V:i32", {"STREAM": 1, "BLOCK": 1024})
print("compiled")
"""


def test_kernels_compile_for_hopper():
    """No GPU in CI: compile every step kernel ahead of time for sm_90 (bf16 logits, each policy and
    divergence kind, libdevice log, FMA fusion off), so a construct only the interpreter accepts fails
    here. In a subprocess: the interpreter (TRITON_INTERPRET=1) must be off."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _AOT_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def divergence_from_definitions(s, t, kind, *, beta, alpha, temperature):
    """Float64 divergences [B] written out from their definitions (docs/spec.md), independently of
    adaswitch/reference.py, which the "torch" implementation runs: 0 log 0 = 0, +inf where p > 0 meets
    q = 0."""
    ls, lt = torch.log_softmax(s.double() / temperature, -1), torch.log_softmax(t.double() / temperature, -1)
    ps, pt = ls.exp(), lt.exp()

    def kl(log_p, log_q):
        p = log_p.exp()
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)

    def log_mix(w, a, b):  # log(w a + (1 - w) b)
        return torch.log(w * a + (1 - w) * b)

    if kind == "forward_kl":
        return kl(lt, ls)
    if kind == "reverse_kl":
        return kl(ls, lt)
    if kind == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    if kind == "jsd":
        m = log_mix(beta, pt, ps)
        return beta * kl(lt, m) + (1 - beta) * kl(ls, m)
    if kind == "skew_forward_kl":
        return kl(lt, log_mix(alpha, pt, ps))
    if kind == "skew_reverse_kl":
        return kl(ls, log_mix(alpha, ps, pt))
    raise ValueError(kind)


@pytest.mark.parametrize("impl", ["torch", *FAST])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergence_against_float64_reference(impl, dtype):
    """The exploration divergence of every kind, at a divergence temperature, against the definitions in
    float64 (on the same rounded inputs; not reference.py, so the "torch" implementation is checked too)."""
    s, t = random_logits(1, 6, 211, dtype)
    for kind in KINDS:
        policy = AdaSwitch(window=2, divergence=kind, beta=0.3, alpha=0.2, divergence_temperature=1.7)
        out = fused_step(s[0], t[0], policy, SwitchState.new(6, 2), seed=0, keys=torch.arange(6),
                         position=torch.zeros(6, dtype=torch.long), eos_token_id=EOS, pad_token_id=PAD,
                         impl=impl)
        want = divergence_from_definitions(s[0], t[0], kind, beta=0.3, alpha=0.2, temperature=1.7)
        assert torch.isinf(want).any() == (kind == "reverse_kl"), kind  # the teacher-only -inf entry
        assert torch.allclose(out.divergence.double(), want, rtol=1e-4, atol=1e-5), kind
