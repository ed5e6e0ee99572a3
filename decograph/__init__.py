"""decograph: a compiler for LLM decoding algorithms."""
from __future__ import annotations

__version__ = "0.1.0"
