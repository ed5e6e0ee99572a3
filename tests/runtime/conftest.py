"""The runtime tests exercise strategies as written, lowered only by the passes whose
invariants they check (one tree-masked forward per step, accepted KV kept in place); the
optimizing passes (tuning, batching) have their own tests in tests/passes."""
from __future__ import annotations

import pytest

import decograph.passes as passes

RUNTIME_PIPELINE = "mask-fusion{layout=sequence},cache-reuse"


@pytest.fixture(autouse=True)
def _lowering_only_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(passes.DEFAULT_PIPELINES, "torch", RUNTIME_PIPELINE)
