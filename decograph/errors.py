"""decograph's error types. Every error a user can cause is one of these."""
from __future__ import annotations


class DecographError(Exception):
    """Base of every error decograph raises on purpose."""


class VerifyError(DecographError):
    """An IR program breaks a rule: names the op, the operand or field, and what would fix it."""


class ParseError(DecographError):
    """IR text that does not parse: names the line and column."""


class StrategyFileError(DecographError):
    """A strategy file that cannot be loaded: names the file, the line and the field."""


class ModelError(DecographError):
    """A model that cannot be loaded or driven (missing wheel, unsupported cache, bad directory)."""


class InputError(DecographError):
    """Bad generate() input: empty prompt, prompt past the context length, bad budget."""


class UnsupportedError(DecographError):
    """A valid program that this backend or model cannot run (names the op)."""


class PassError(DecographError):
    """A pass failed or produced invalid IR; the message names it and the passes before it."""


class BackendError(DecographError):
    """An unknown, broken or unavailable backend (names it, and the plugin it came from)."""
