"""Every Triton launch the library makes, compiled for sm_90 (H100 / H200) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, the rest of the suite) hides a class of faults: launcher keyword
errors, constructs only the interpreter accepts, int32 index types, register spills. Here a subprocess
without the interpreter installs a stand-in driver whose target is GPUTarget("cuda", 90, 32), then calls
the library's own host functions (token_divergence, distill_loss and its backward, the fused-linear
chunks, fused_step, fused_lookahead, the RNG kernel) on CPU tensors with every kind, policy and dtype
they are launched with. Every launch goes through adaswitch.kernels.triton.launch.launch, whose
compile-only mode hands it to Triton's real launcher with warmup=True: the arguments are bound and
specialised exactly as for a launch, the kernel is compiled down to a cubin by the ptxas in the triton
wheel, and nothing runs. The checks:

- no launch raises (launcher keyword errors, compile errors, ptxas errors);
- no compiled kernel spills (cuobjdump's STACK / LOCAL are 0) or needs more shared memory than sm_90 has;
- every `launch(...)` call site in the library's source was reached by the sweep and every kernel (a
  @triton.jit function that reads tl.program_id) was compiled, so a new launch site or kernel without
  coverage here fails;
- the divergence kernel's pointer offsets are int64 (a transposed [16384, 151936] input has column
  offsets past 2^31).

The first run fills Triton's cache (a few minutes on two cores); later runs take seconds.
Run the sweep by hand: `python tests/test_triton_compile.py REPORT.json` (without TRITON_INTERPRET).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = (ROOT / "adaswitch", ROOT / "kernels")
KERNEL_DIR = ROOT / "kernels" / "triton"
SM90_SHARED_BYTES = 232448  # the opt-in maximum per block on sm_90

TRANSPOSED_VOCAB, TRANSPOSED_ROWS = 151936, 16384


# ------------------------------------------------------------------------------------------ the sweep
# (runs in the subprocess; nothing below this line up to the tests imports adaswitch in pytest's process)

def _install_stand_in_driver():
    """Makes Triton's launcher believe the current device is an sm_90 GPU (no CUDA needed)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.backends.nvidia.driver import ty_to_cpp

    class StandInCudaDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty_to_cpp(ty)

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("the stand-in driver cannot run kernels")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

        def get_device_capability(self, device=0):
            return (9, 0)

    triton.runtime.driver.set_active(StandInCudaDriver())


def _cases():
    """(label, thunk) for every launch configuration the library uses."""
    import torch

    from adaswitch._validation import KINDS
    from adaswitch.kernels.triton.step import uniform_triton
    from adaswitch.ops import distill_loss, fused_linear_distill_loss, fused_lookahead, fused_step, token_divergence
    from adaswitch.ops.step import SwitchState
    from adaswitch.policies import SKD, AdaSwitch, Mixed, Sampling, Student, Teacher

    f32, bf16, f16, f64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
    big, odd, tiny = 151936, 50257, 300
    cases = []

    def add(label, fn):
        cases.append((label, fn))

    # token_divergence: every kind x dtype (and a mixed pair), odd vocabulary, transposed and unaligned views
    for ds, dt in ((f32, f32), (bf16, bf16), (f16, f16), (f64, f64), (bf16, f32)):
        for kind in KINDS:
            add(f"token_divergence {kind} {ds}/{dt}", lambda kind=kind, ds=ds, dt=dt: token_divergence(
                torch.zeros(4, big, dtype=ds), torch.zeros(4, big, dtype=dt), kind, impl="triton"))
    for kind in KINDS:
        add(f"token_divergence {kind} bf16 V={odd}", lambda kind=kind: token_divergence(
            torch.zeros(4, odd, dtype=bf16), torch.zeros(4, odd, dtype=bf16), kind, impl="triton"))
        add(f"token_divergence {kind} bf16 transposed", lambda kind=kind: token_divergence(
            torch.zeros(big, 4, dtype=bf16).t(), torch.zeros(big, 4, dtype=bf16).t(), kind, impl="triton"))
    add("token_divergence forward_kl bf16 unaligned view", lambda: token_divergence(
        torch.zeros(4, big + 1, dtype=bf16)[:, 1:], torch.zeros(4, big + 1, dtype=bf16)[:, 1:], impl="triton"))

    # distill_loss: every kind x dtype with labels and a gradient; inference (no labels, no gradient)
    def loss(kind, ds, dt, grad=True, labels=True, reduction="mean", vocab=big, **kw):
        s = torch.zeros(2, 3, vocab, dtype=ds, requires_grad=grad)
        lab = torch.zeros(2, 3, dtype=torch.long) if labels else None
        out = distill_loss(s, torch.zeros(2, 3, vocab, dtype=dt), kind, labels=lab, reduction=reduction,
                           impl="triton", **kw)
        if grad:
            out.sum().backward()

    for kind in KINDS:
        for dtype in (f32, bf16, f16, f64):
            add(f"distill_loss {kind} {dtype}", lambda kind=kind, dtype=dtype: loss(kind, dtype, dtype))
        add(f"distill_loss {kind} bf16 no grad", lambda kind=kind: loss(kind, bf16, bf16, False, False))
        add(f"distill_loss {kind} bf16/fp32 none", lambda kind=kind: loss(kind, bf16, f32, reduction="none"))
        add(f"distill_loss {kind} bf16 V={odd}", lambda kind=kind: loss(kind, bf16, bf16, vocab=odd))
        # the hard-label term at the loss temperature (one log-sum-exp) and at another (a second one)
        for temperature in (1.0, 2.0):
            add(f"distill_loss {kind} bf16 hard T={temperature}", lambda kind=kind, temperature=temperature: loss(
                kind, bf16, bf16, weight_hard_loss=0.5, temperature=temperature))
            add(f"distill_loss {kind} fp32 hard T={temperature} no grad", lambda kind=kind, temperature=temperature:
                loss(kind, f32, f32, False, weight_hard_loss=0.5, temperature=temperature))
    # the hard-label term alone (no soft term: the teacher is not read) and the sampled-token form
    for dtype in (f32, bf16, f16, f64):
        add(f"distill_loss hard only {dtype}", lambda dtype=dtype: loss(
            "forward_kl", dtype, dtype, weight_hard_loss=1.0, weight_soft_loss=0.0))
        add(f"distill_loss sampled {dtype}", lambda dtype=dtype: loss("sampled_reverse_kl", dtype, dtype, discount=0.5))
        add(f"distill_loss sampled {dtype} V={odd} hard", lambda dtype=dtype: loss(
            "sampled_reverse_kl", dtype, dtype, vocab=odd, weight_hard_loss=0.5, temperature=2.0))

    # the fused-linear loss's chunks (fp32 logits; fp64 for fp64 inputs), per-row scale for reduction="none"
    def fused(kind, dtype, reduction="mean", labels=True):
        hs = torch.zeros(6, 16, dtype=dtype, requires_grad=True)
        ws = torch.zeros(big, 16, dtype=dtype, requires_grad=True)
        lab = torch.zeros(6, dtype=torch.long) if labels else None
        out = fused_linear_distill_loss(hs, ws, torch.zeros(6, 24, dtype=dtype), torch.zeros(big, 24, dtype=dtype),
                                        kind, labels=lab, reduction=reduction, chunk_size=4, impl="triton")
        out.sum().backward()

    for kind in KINDS:
        add(f"fused_linear {kind} bf16", lambda kind=kind: fused(kind, bf16))
        add(f"fused_linear {kind} fp32 none", lambda kind=kind: fused(kind, f32, "none", False))
        add(f"fused_linear {kind} fp64", lambda kind=kind: fused(kind, f64))
    add("fused_linear sampled bf16 none", lambda: fused("sampled_reverse_kl", bf16, "none"))

    # the decode step and lookahead: every policy (AdaSwitch with every divergence), greedy / sampled /
    # filtered, bf16 / fp32 / fp16 logits, the large-vocabulary tile and a tiny model's
    samplings = {"greedy": Sampling(0.0), "sampled": Sampling(0.8), "filtered": Sampling(0.7, top_k=50, top_p=0.9)}
    policies = {f"student {n}": Student(sampling=s) for n, s in samplings.items()}
    policies.update({f"teacher {n}": Teacher(sampling=s) for n, s in samplings.items()})
    policies["mixed"] = Mixed()
    policies["skd"] = SKD(top_k=5)
    policies["skd greedy/filtered"] = SKD(top_k=5, student_sampling=Sampling(0.0),
                                          teacher_sampling=Sampling(0.7, top_p=0.9))
    for kind in KINDS:
        policies[f"adaswitch {kind}"] = AdaSwitch(window=4, divergence=kind)
    policies["adaswitch jsd beta=0"] = AdaSwitch(window=4, divergence="jsd", beta=0.0)
    policies["adaswitch filtered"] = AdaSwitch(window=3, student_sampling=Sampling(0.7, top_k=20),
                                               teacher_sampling=Sampling(0.0))

    def step(policy, dtype, vocab, student=True):
        b = 3
        needs_s = student and not isinstance(policy, Teacher)
        needs_t = not isinstance(policy, (Student, Mixed))
        state = SwitchState.new(b, getattr(policy, "window", 1))
        fused_step(torch.zeros(b, vocab, dtype=dtype) if needs_s else None,
                   torch.zeros(b, vocab, dtype=dtype) if needs_t else None, policy, state, seed=1,
                   keys=torch.arange(b), position=torch.zeros(b, dtype=torch.long), eos_token_id=1,
                   pad_token_id=0, impl="triton")

    def lookahead(policy, dtype, vocab, g=4):
        b = 3
        state = SwitchState.new(b, getattr(policy, "window", 1))
        fused_lookahead(torch.zeros(b, g, vocab, dtype=dtype), torch.zeros(b, g, vocab, dtype=dtype),
                        torch.zeros(b, g, dtype=torch.long), policy, state, seed=1, keys=torch.arange(b),
                        position=torch.zeros(b, dtype=torch.long), eos_token_id=1, pad_token_id=0, impl="triton")

    for name, policy in policies.items():
        for dtype in (bf16, f32):
            add(f"fused_step {name} {dtype}", lambda p=policy, d=dtype: step(p, d, big))
            if isinstance(policy, (SKD, AdaSwitch, Student, Teacher)):
                add(f"fused_lookahead {name} {dtype}", lambda p=policy, d=dtype: lookahead(p, d, big))
    for name in ("adaswitch forward_kl", "adaswitch jsd", "skd", "student sampled", "teacher greedy"):
        add(f"fused_step {name} fp32 V={tiny}", lambda p=policies[name]: step(p, f32, tiny))
        add(f"fused_lookahead {name} fp32 V={tiny}", lambda p=policies[name]: lookahead(p, f32, tiny))
    for name in ("adaswitch forward_kl", "adaswitch jsd", "adaswitch skew_reverse_kl", "skd"):
        for dtype in (f16, f64):
            add(f"fused_step {name} {dtype}", lambda p=policies[name], d=dtype: step(p, d, big))
            add(f"fused_lookahead {name} {dtype}", lambda p=policies[name], d=dtype: lookahead(p, d, big))
    add("fused_step adaswitch, no student logits", lambda: step(policies["adaswitch forward_kl"], bf16, big, False))

    # speculative guidance: greedy / sampled / filtered on both sides, bf16 / fp32, large and tiny vocabularies
    from adaswitch.ops import fused_speculative

    def speculative(ss, ts, dtype, vocab, g=4):
        b = 3
        fused_speculative(torch.zeros(b, g, vocab, dtype=dtype), torch.zeros(b, g, vocab, dtype=dtype),
                          torch.zeros(b, g, dtype=torch.long), torch.zeros(b, dtype=torch.long), student_sampling=ss,
                          teacher_sampling=ts, seed=1, keys=torch.arange(b), position=torch.zeros(b, dtype=torch.long),
                          eos_token_id=1, pad_token_id=0, impl="triton")

    for (sn, ss), (tn, ts) in (
        (("sampled", samplings["sampled"]), ("sampled", samplings["sampled"])),
        (("filtered", samplings["filtered"]), ("greedy", samplings["greedy"])),
        (("greedy", samplings["greedy"]), ("filtered", samplings["filtered"])),
    ):
        for dtype in (bf16, f32):
            add(f"fused_speculative {sn}/{tn} {dtype}", lambda ss=ss, ts=ts, d=dtype: speculative(ss, ts, d, big))
        add(f"fused_speculative {sn}/{tn} fp32 V={tiny}", lambda ss=ss, ts=ts: speculative(ss, ts, f32, tiny))

    for stream in (0, 1, 2):
        add(f"uniform_triton stream {stream}", lambda stream=stream: uniform_triton(
            3, torch.arange(2), torch.zeros(2, dtype=torch.long), stream, 1000))
    return cases


def _transposed_divergence_ttir():
    """TTIR of the divergence kernel for a transposed bf16 [16384, 151936] input (strides (1, 16384)),
    through the real launcher: only the strides matter to the code, so small tensors stand in."""
    import torch

    from adaswitch.kernels.triton.divergence import _divergence_kernel
    from adaswitch.kernels.triton.launch import compile_only, launch

    x = torch.zeros(64, dtype=torch.bfloat16)
    out = torch.zeros(4)
    with compile_only():
        kernel = launch(_divergence_kernel, (TRANSPOSED_ROWS,), x, x, out, 1, TRANSPOSED_ROWS, 1, TRANSPOSED_ROWS,
                        TRANSPOSED_VOCAB, 1.0, 0.5, MODE=1, BLOCK=4096, num_warps=8, device=x.device)
    return kernel.asm["ttir"]


def _reserved_keyword_is_rejected() -> bool:
    """The harness must see the launcher's keyword checks: a kernel with a constexpr named `stream`."""
    import torch
    import triton
    import triton.language as tl

    from adaswitch.kernels.triton.launch import LAUNCHES, compile_only, launch

    @triton.jit
    def _probe(OUT, stream: tl.constexpr):
        tl.store(OUT + tl.program_id(0), stream)

    try:
        with compile_only():
            launch(_probe, (1,), torch.zeros(1, dtype=torch.int32), stream=1, device=torch.device("cpu"))
    except (AssertionError, KeyError) as err:
        return "stream" in str(err)
    finally:
        LAUNCHES.pop("_probe", None)
    return False


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}


def _compiled_kernels():
    """(kernel name, CompiledKernel) for everything compiled in this process, from the launcher's caches."""
    import importlib

    import triton

    found = []
    for path in sorted(KERNEL_DIR.glob("*.py")):
        module = importlib.import_module(f"adaswitch.kernels.triton.{path.stem}")
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction) and obj.module == module.__name__:
                for caches in obj.device_caches.values():
                    found += [(name, k) for k in caches[0].values()]
    return found


def sweep(report_path: str) -> None:
    import time

    _install_stand_in_driver()
    import triton

    import adaswitch._backend as backend

    backend.triton_available = lambda device: True  # CPU tensors stand in for CUDA ones (nothing runs)
    from adaswitch.kernels.triton.launch import LAUNCHES, compile_only

    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    start = time.time()
    errors = []
    cases = _cases()
    with compile_only():
        for label, fn in cases:
            try:
                fn()
            except Exception as err:  # noqa: BLE001  (every failure is reported, the sweep goes on)
                errors.append(f"{label}: {type(err).__name__}: {str(err)[-1500:]}")
    report = {"cases": len(cases), "errors": errors}
    try:
        report["transposed_ttir"] = _transposed_divergence_ttir()
    except Exception as err:  # noqa: BLE001
        errors.append(f"transposed divergence: {type(err).__name__}: {str(err)[-1500:]}")
        report["transposed_ttir"] = ""
    report["reserved_keyword_rejected"] = _reserved_keyword_is_rejected()
    report["launch_sites"] = sorted({site for sites in LAUNCHES.values() for site, _ in sites})
    kernels = []
    for name, kernel in _compiled_kernels():
        usage = _resource_usage(kernel.asm["cubin"], cuobjdump)
        kernels.append({"kernel": name, "constants": str(kernel.src.constants),
                        "signature": str(kernel.src.signature), "shared": kernel.metadata.shared,
                        "num_warps": kernel.metadata.num_warps, **usage})
    report["kernels"] = kernels
    report["seconds"] = time.time() - start
    Path(report_path).write_text(json.dumps(report, indent=1))


# --------------------------------------------------------------------------------------------- source

def _launch_sites_in_source() -> set[str]:
    """"file:function" of every call to `launch(...)` in the library's source."""
    sites = set()
    for base in SOURCE_DIRS:
        for path in base.rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for func in ast.walk(tree):
                if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(func):
                        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                                and node.func.id == "launch"):
                            sites.add(f"{path.resolve()}:{func.name}")
    return sites


def _direct_launches_in_source() -> list[str]:
    """`something[grid](...)` calls outside launch.py: launches that bypass the registry."""
    found = []
    for base in SOURCE_DIRS:
        for path in base.rglob("*.py"):
            if path.resolve() == (KERNEL_DIR / "launch.py").resolve():
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _kernels_in_source() -> set[str]:
    """Names of the @triton.jit functions under kernels/triton that read tl.program_id (launchable)."""
    names = set()
    for path in KERNEL_DIR.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and "tl.program_id" in ast.unparse(node):
                if any("triton.jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


# ---------------------------------------------------------------------------------------------- tests

if __name__ != "__main__":
    import pytest

    def _tool(name: str) -> Path | None:
        try:
            import triton
        except ImportError:
            return None
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        return path if path.exists() else None

    @pytest.fixture(scope="module")
    def report(tmp_path_factory):
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        if _tool("ptxas") is None:
            pytest.skip("ptxas is missing from the triton wheel (triton/backends/nvidia/bin): cannot compile for sm_90")
        if _tool("cuobjdump") is None:
            pytest.skip("cuobjdump is missing from the triton wheel: cannot read register / stack usage")
        path = tmp_path_factory.mktemp("triton_compile") / "report.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the GPU's default; the step kernels set it off themselves
        env.pop("ADASWITCH_TRITON_MAX_BLOCK", None)
        proc = subprocess.run([sys.executable, __file__, str(path)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=1800)
        assert proc.returncode == 0 and path.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
        return json.loads(path.read_text())

    def test_every_launch_compiles_for_sm90(report):
        assert not report["errors"], "\n".join(report["errors"])
        assert report["cases"] > 100 and len(report["kernels"]) > 50

    def test_the_harness_sees_launcher_keyword_errors(report):
        """A constexpr named `stream` (reserved by Triton's launcher) must fail here, as it does on a GPU."""
        assert report["reserved_keyword_rejected"]

    def test_no_spills_and_shared_memory_fits(report):
        bad = [k for k in report["kernels"]
               if k.get("STACK", 1) or k.get("LOCAL", 1) or k["shared"] > SM90_SHARED_BYTES]
        assert not bad, json.dumps(bad, indent=1)

    def test_every_launch_site_and_kernel_is_covered(report):
        direct = _direct_launches_in_source()
        assert not direct, f"launch kernels through adaswitch.kernels.triton.launch.launch: {direct}"
        missing_sites = _launch_sites_in_source() - set(report["launch_sites"])
        assert not missing_sites, f"launch sites the compile sweep never reached (add a case): {missing_sites}"
        missing_kernels = _kernels_in_source() - {k["kernel"] for k in report["kernels"]}
        assert not missing_kernels, f"kernels the compile sweep never compiled (add a case): {missing_kernels}"

    def test_divergence_offsets_are_int64_for_transposed_inputs(report):
        """Column stride 16384 x column index up to 151935 passes 2^31: every pointer offset must be i64."""
        ttir = report["transposed_ttir"]
        assert "%stride_x_col" in ttir or "stride_x_col" in ttir, "the column stride was specialised away"
        offsets = re.findall(r"tt\.addptr [^\n]*?: [^\n]*?, (tensor<[^>]*>|i\d+)", ttir)
        assert offsets, ttir[:2000]
        narrow = [o for o in offsets if not o.endswith("xi64>") and o != "i64"]
        assert not narrow, f"32-bit pointer offsets in the divergence kernel: {narrow}"
        assert not re.search(r"arith\.muli [^\n]*: tensor<\d+xi32>", ttir), "32-bit index products"


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sweep(sys.argv[1])
