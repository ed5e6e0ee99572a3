"""Text from outside (argv, stdin, the Python API) checked once as it enters: valid UTF-8, or an
``InputError`` naming it. Python hands undecodable argv bytes over as lone surrogates
(``surrogateescape``: byte 0xff becomes U+DCFF), which a tokenizer would fail on deep inside."""
from __future__ import annotations

from decograph.errors import InputError

__all__ = ["check_utf8"]

_FIX = "give it as UTF-8 text"


def check_utf8(value: str | bytes, what: str) -> str:
    """``value`` as a ``str`` that encodes to UTF-8 (bytes are decoded strictly), or an
    ``InputError`` saying ``"{what} is not valid UTF-8: byte 0xff at offset 3; ..."``.
    A str with lone surrogates from ``surrogateescape`` (argv) is reported by its raw byte."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not valid UTF-8: byte 0x{value[exc.start]:02x} at offset {exc.start}; "
                             f"{_FIX}") from None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError as exc:
        char = value[exc.start]
        if "\udc80" <= char <= "\udcff":          # an undecodable byte smuggled through by surrogateescape
            raw = value.encode("utf-8", "surrogateescape")
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as dec:
                raise InputError(f"{what} is not valid UTF-8: byte 0x{raw[dec.start]:02x} at offset {dec.start}; "
                                 f"{_FIX}") from None
        raise InputError(f"{what} is not valid UTF-8: it holds a lone surrogate U+{ord(char):04X} at character "
                         f"{exc.start}; {_FIX}") from None
