"""Triton's kernels run in its CPU interpreter here: the variable must be set before the
kernel module is imported (``triton.jit`` reads it when it decorates)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after TRITON_INTERPRET is set)


@pytest.fixture(scope="module")
def tiny():
    """A random-weight Llama (``tiny_llama``) for the ONNX Runtime tests."""
    from decograph.models.tiny import tiny_llama

    return tiny_llama()
