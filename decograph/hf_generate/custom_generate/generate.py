"""decograph's transformers ``custom_generate`` (directory form): transformers copies this file
and calls its ``generate`` with the arguments of ``model.generate``, ``strategy=`` included.
See ``decograph.hf_generate``."""
from decograph.hf_generate import generate

__all__ = ["generate"]
