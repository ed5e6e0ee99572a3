"""The runtime: the one interpreter of optimized programs, and what it needs (rows, draft
sources, verification and join rules, the step protocol a backend implements). Imports
neither torch nor transformers."""
from __future__ import annotations

from decograph.runtime.interp import Admission, Event, Interpreter, RunConfig
from decograph.runtime.protocol import Batch, Engine, StepOutput, StepPlan

__all__ = ["Admission", "Event", "Interpreter", "RunConfig", "Batch", "Engine", "StepOutput", "StepPlan"]
