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


def pytest_report_header(config):
    from adaswitch._backend import native_available, triton_interpreted

    return f"adaswitch: native op built={native_available()}, triton interpreter={triton_interpreted()}"
