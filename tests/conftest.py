"""Test set-up: Triton kernels run under the interpreter on CPU (set before adaswitch is imported)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (60x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    """The tiny Qwen2-style teacher, its embedding padded past the tokenizer's vocabulary (320 vs 300)."""
    from tiny_models import VOCAB_SIZE, tiny_teacher

    return tiny_teacher(vocab_size=VOCAB_SIZE + 20)


@pytest.fixture(scope="module")
def student():
    """The tiny Llama-style student."""
    from tiny_models import tiny_student

    return tiny_student()


@pytest.fixture(scope="module")
def near_teacher():
    """A student that nearly is the teacher (its weights plus small noise): greedy drafts are often the
    teacher's argmax, so blocks keep several drafts (guided ones take the bonus), and sometimes not."""
    from tiny_models import VOCAB_SIZE, tiny_teacher

    model = tiny_teacher(vocab_size=VOCAB_SIZE + 20)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for w in model.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.002)
    return model


@pytest.fixture(scope="module")
def prompts(request):
    """(input_ids, attention_mask): the requesting module's B left-padded random prompts of 2 to P tokens."""
    from tiny_models import random_prompts

    return random_prompts(request.module.B, request.module.P, min_len=2, seed=5)


def pytest_report_header(config):
    from adaswitch._backend import native_available, triton_interpreted

    return f"adaswitch: native op built={native_available()}, triton interpreter={triton_interpreted()}"


class _TypedFloat(float):
    """A Python float that also answers `.to(dtype)` (with itself)."""

    def to(self, dtype):
        return self


class _ScalarArgsKernel:
    """A Triton kernel whose Python float arguments are passed as `_TypedFloat`s. Liger's kl_div and tvd
    kernels cast a float argument with `x.to(tl.float32)`: a compiled kernel receives a typed scalar there,
    the Triton interpreter a bare Python float, which has no `.to`; with this wrapper the same kernel code
    runs under the interpreter, so the comparison with Liger runs on CPU too."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            wrap = lambda x: _TypedFloat(x) if type(x) is float else x  # noqa: E731
            return launch(*map(wrap, args), **{k: wrap(v) for k, v in kwargs.items()})

        return run


@pytest.fixture
def liger_on_interpreter(monkeypatch):
    """Makes Liger's kl_div and tvd Triton kernels runnable under the Triton interpreter (CPU): see
    `_ScalarArgsKernel`. A no-op on GPU, where the kernels are compiled."""
    from adaswitch._backend import triton_interpreted

    if not triton_interpreted():
        return
    for module, name in (("liger_kernel.ops.kl_div", "_kldiv_kernel_forward"),
                         ("liger_kernel.ops.tvd", "_tv_distance_kernel")):
        try:
            mod = __import__(module, fromlist=[name])
        except ImportError:
            continue
        monkeypatch.setattr(mod, name, _ScalarArgsKernel(getattr(mod, name)))
