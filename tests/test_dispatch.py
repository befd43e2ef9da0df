"""Implementation dispatch (adaswitch._backend) and dtype handling shared by the ops."""

import pytest
import torch

import adaswitch
from adaswitch import reference
from adaswitch._backend import resolve_impl


def test_unknown_impl_is_named():
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("cuda-magic", torch.device("cpu"))


def test_env_variable_picks_the_implementation(monkeypatch):
    monkeypatch.setenv("ADASWITCH_IMPL", "torch")
    assert resolve_impl(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("ADASWITCH_IMPL", "bogus")
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl(None, torch.device("cpu"))


def test_native_refuses_non_cpu_devices():
    with pytest.raises(ValueError, match="CPU tensors only"):
        resolve_impl("native", torch.device("meta"))


@pytest.mark.parametrize("impl", ["torch", "native", "triton"])
def test_mixed_dtypes_bf16_teacher_fp32_student(impl):
    """A bf16 teacher beside an fp32 student is common; every backend must accept the pair."""
    if impl == "native" and not adaswitch.native_available():
        pytest.skip("native op not built")
    student = torch.randn(5, 37)
    teacher = torch.randn(5, 37).bfloat16()
    expected = reference.divergence_rows(student.double(), teacher.double(), "forward_kl", dtype=torch.float64)
    got = adaswitch.token_divergence(student, teacher, impl=impl)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
