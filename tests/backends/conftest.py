"""Triton's kernels run in its CPU interpreter here: the variable must be set before the
kernel module is imported (``triton.jit`` reads it when it decorates)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
