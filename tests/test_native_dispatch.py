"""The native op's per-capability builds (CMakeLists.txt: adaswitch._C_default, _C_avx2, _C_avx512) and the
run-time choice among them (adaswitch._backend.native_ops):

- the variants this CPU can run are built, and the widest of them is the one loaded;
- ATEN_CPU_CAPABILITY=default / avx2 (/ avx512) loads that variant, whose every op matches the PyTorch / float64
  reference (each in a subprocess: a process loads one variant only). The checks are the existing tests of each
  op, called with impl="native";
- a variant that fails to import gives way to the next narrower one;
- the portable builds hold no wider instruction: no AVX-512 (zmm, mask or upper-16 registers) in the DEFAULT and
  AVX2 variants, no AVX at all (ymm, or any VEX-encoded instruction) in the DEFAULT one (objdump -d).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_divergence
import test_guidance
import test_loss
import test_native_step
import test_rng
import test_step
import torch

from adaswitch._backend import NATIVE_VARIANTS, native_available, native_capability
from adaswitch._validation import KINDS
from adaswitch.policies import SKD, Sampling, Student, Teacher

ROOT = Path(__file__).resolve().parents[1]
FORCED = "ADASWITCH_TEST_FORCED_VARIANT"  # set only in the subprocesses of test_forced_variant
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def widest_supported() -> str:
    """The widest variant this CPU runs, from its own flags (not from torch)."""
    flags = cpu_flags()
    if X86 and AVX512_FLAGS <= flags:
        return "avx512"
    if X86 and {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "default"


def runnable() -> list[str]:
    return list(NATIVE_VARIANTS[NATIVE_VARIANTS.index(widest_supported()):])


def variant_path(variant: str) -> Path | None:
    spec = importlib.util.find_spec(f"adaswitch._C_{variant}")  # finds the file without loading it
    return Path(spec.origin) if spec is not None and spec.origin else None


def loaded_variants() -> list[str]:
    return sorted(name for name in sys.modules if re.fullmatch(r"adaswitch\._C_\w+", name))


needs_native = pytest.mark.skipif(not native_available(), reason="no native variant built")


# ------------------------------------------------------------------------------------- what is built and loaded

@needs_native
def test_the_variants_this_cpu_runs_are_built():
    missing = [v for v in runnable() if variant_path(v) is None]
    assert not missing, f"native variants {missing} not built (runnable here: {runnable()})"
    if not X86:
        assert variant_path("avx2") is None and variant_path("avx512") is None, "x86 variants on a non-x86 build"


@needs_native
def test_the_widest_variant_is_loaded():
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    if forced and not os.environ.get(FORCED):
        pytest.skip(f"ATEN_CPU_CAPABILITY={forced} is set for this run")
    expected = os.environ.get(FORCED) or widest_supported()
    assert native_capability() == expected
    assert loaded_variants() == [f"adaswitch._C_{expected}"]
    assert sys.modules[f"adaswitch._C_{expected}"].CPU_CAPABILITY == expected.upper()


def _run_python(code: str, **env):
    environ = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=300)


@needs_native
@pytest.mark.skipif("avx2" not in runnable(), reason="needs a CPU with AVX2")
def test_a_variant_that_fails_to_import_gives_way_to_a_narrower_one():
    code = (
        "import sys\n"
        "class Broken:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name == 'adaswitch._C_avx2': raise ImportError('undefined symbol: simulated')\n"
        "sys.meta_path.insert(0, Broken)\n"
        "from adaswitch._backend import native_capability, native_ops\n"
        "print(native_capability(), hasattr(native_ops(), 'token_divergence'),\n"
        "      sorted(m for m in sys.modules if m.startswith('adaswitch._C')))\n"
    )
    result = _run_python(code, ATEN_CPU_CAPABILITY="avx2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["default", "True", "['adaswitch._C_default']"]


@needs_native
@pytest.mark.skipif(not X86 or widest_supported() == "avx512", reason="needs an x86 CPU without AVX-512")
def test_forcing_a_capability_the_cpu_lacks_loads_what_it_runs():
    """torch reports AVX512 when ATEN_CPU_CAPABILITY=avx512 asks for it, AVX-512 or not; the AVX-512 variant would
    die on SIGILL while it loads."""
    code = "from adaswitch._backend import native_capability; print(native_capability())"
    result = _run_python(code, ATEN_CPU_CAPABILITY="avx512")
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.split() == [widest_supported()]


# --------------------------------------------------------------------------- a forced variant against the references

@pytest.mark.parametrize("variant", NATIVE_VARIANTS[::-1])
def test_forced_variant(variant):
    """ATEN_CPU_CAPABILITY=<variant> in a subprocess: that variant is loaded, and the op checks below (defined
    only there) pass with it."""
    if not native_available():
        pytest.skip("no native variant built")
    if variant not in runnable():
        pytest.skip(f"this CPU cannot run the {variant} variant")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": variant, FORCED: variant}
    env.pop("ADASWITCH_IMPL", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", Path(__file__).name,
           "-k", "test_the_widest_variant_is_loaded or test_in_variant_"]
    result = subprocess.run(cmd, cwd=Path(__file__).parent, env=env, capture_output=True, text=True, timeout=900)
    tail = result.stdout[-4000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail))
    assert counts.get("passed", 0) >= 60 and set(counts) == {"passed"}, tail


if os.environ.get(FORCED):  # the checks test_forced_variant runs in its subprocess, on the forced variant
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("case", ["normal", "peaked", "masked", "identical"])
    @pytest.mark.parametrize("kind", KINDS)
    def test_in_variant_token_divergence(kind, case, dtype):
        test_divergence.test_matches_reference("native", dtype, case, kind)  # 3 x 1271; masked: -inf entries

    @pytest.mark.parametrize("vocab", [1, 7, 33, 32000])
    def test_in_variant_token_divergence_shapes(vocab):
        for kind in KINDS:
            test_divergence.test_vocab_sizes("native", vocab, kind)
        test_divergence.test_float64_inputs("native")
        test_divergence.test_mixed_dtypes("native")
        test_divergence.test_bad_rows_give_nan("native", "jsd")
        test_divergence.test_infinite_where_support_differs("native")

    @pytest.mark.parametrize("kind,beta,alpha", test_loss.CASES)
    def test_in_variant_distill_loss_rows(kind, beta, alpha):
        test_loss.test_values_and_gradients("native", 2.0, kind, beta, alpha)  # float64, computed in double

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_in_variant_distill_loss_rows_dtypes(dtype):
        test_loss.test_reductions_dtypes_odd_shape("native", "none", dtype)  # [3, 5, 301], labels, T = 2
        test_loss.test_one_sided_neg_inf("native", "jsd", 0.1, 0.1)
        test_loss.test_mixed_dtypes("native")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
    def test_in_variant_gumbel_argmax(dtype):
        test_rng.test_native_draws_match_reference(dtype)  # [48, 1500] with a -inf tail, every sampling mode

    def test_in_variant_logit_rank():
        test_step.test_native_logit_rank()

    @pytest.mark.parametrize("policy", test_native_step.POLICIES[:4], ids=lambda p: f"{type(p).__name__}-{p.window}")
    def test_in_variant_step_decide(monkeypatch, policy):
        test_native_step.test_native_rule_matches_the_reference(monkeypatch, policy)

    @pytest.mark.parametrize("policy", test_native_step.POLICIES[:1] + [SKD(top_k=3), Student(), Teacher()],
                             ids=lambda p: type(p).__name__)
    def test_in_variant_lookahead_decide(monkeypatch, policy):
        test_native_step.test_native_lookahead_matches_the_reference(monkeypatch, policy)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_in_variant_fused_step_draws(dtype):
        test_native_step.test_native_step_matches_the_eager_native_draws(Sampling(1.3, top_p=0.8), dtype)

    @pytest.mark.parametrize("ss,ts", test_guidance.SAMPLINGS)
    def test_in_variant_speculative_stats(ss, ts):
        gen = torch.Generator().manual_seed(1)
        b, g, v = 13, 4, 37
        s = torch.randn(b, g, v, generator=gen) * 2
        t = torch.cat([s, s[:, -1:]], 1) + torch.randn(b, g + 1, v, generator=gen)
        s[:, :, 5] = t[:, :, 9] = -torch.inf
        keys, pos = torch.arange(b) * 7 + 3, torch.randint(0, 30, (b,), generator=gen)
        draft = test_guidance._drafts(s, ss, keys, pos)
        start = torch.randint(0, g + 1, (b,), generator=gen)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            args = (s.to(dtype), t.to(dtype), draft, start, ss, ts, keys, pos)
            ref, out = test_guidance._spec(*args, "torch"), test_guidance._spec(*args, "native")
            for field in test_guidance.FIELDS:
                assert torch.equal(getattr(out, field), getattr(ref, field)), (dtype, field)


# ------------------------------------------------------------------------------- no wider instruction in the builds

# AT&T syntax (objdump's default): AVX-512 names zmm, mask (k0-k7) and the upper 16 vector registers; AVX names
# ymm, and every VEX/EVEX-encoded instruction (on xmm too) has a mnemonic starting with "v".
AVX512_PATTERN = re.compile(r"%zmm\d|%k[0-7]\b|%[xy]mm(1[6-9]|2\d|3[01])\b")
AVX_PATTERN = re.compile(r"%ymm\d|^\s*[0-9a-f]+:\s+v[a-z0-9]+\s", re.MULTILINE)


def disassembly(variant: str) -> str:
    path = variant_path(variant)
    if path is None:
        pytest.skip(f"the {variant} variant is not built")
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) not installed")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return out


def _offenders(text: str, pattern: re.Pattern) -> list[str]:
    return [line.strip() for line in text.splitlines() if pattern.search(line)][:10]


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
@pytest.mark.parametrize("variant", ["default", "avx2"])
def test_portable_variants_hold_no_avx512(variant):
    text = disassembly(variant)
    assert len(text) > 10_000, "objdump gave no code"
    assert not _offenders(text, AVX512_PATTERN), _offenders(text, AVX512_PATTERN)


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
def test_default_variant_holds_no_avx():
    text = disassembly("default")
    assert not _offenders(text, AVX_PATTERN), _offenders(text, AVX_PATTERN)


@pytest.mark.skipif(not X86, reason="x86 instruction sets")
def test_the_wide_variants_use_their_registers():
    """The check above can see its registers: the AVX2 build holds ymm code (and the AVX-512 build zmm code)."""
    assert re.search(r"%ymm\d", disassembly("avx2"))
    if variant_path("avx512") is not None:
        assert re.search(r"%zmm\d", disassembly("avx512"))
