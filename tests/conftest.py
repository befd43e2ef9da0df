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


def pytest_report_header(config):
    from adaswitch._backend import native_available, triton_interpreted

    return f"adaswitch: native op built={native_available()}, triton interpreter={triton_interpreted()}"
