"""Chat templates rendered without transformers: the model's own Jinja template (as Hugging
Face renders it: a sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``
and ``strftime_now``), over multi-turn messages. The exported decoder's template comes from an
untrusted directory, hence the sandbox.
"""
from __future__ import annotations

import datetime
from typing import Any, Sequence

from decograph.errors import InputError

__all__ = ["render_chat", "check_messages"]

ROLES = ("system", "user", "assistant", "developer", "tool")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` as a list of ``{"role", "content"}`` with text content; anything else is an
    ``InputError`` naming the message and field. Content given as a list of text parts (the
    OpenAI form) is joined."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages: expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}]: expected an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InputError(f"messages[{i}].content[{j}]: only text parts ({{type: text, text}}) are "
                                     "supported")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def render_chat(template: str, messages: list[dict[str, str]], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` under ``template`` (a Hugging Face chat template)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InputError(f"the model's chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                                add_generation_prompt=add_generation_prompt)
    except InputError:
        raise
    except TemplateError as e:
        raise InputError(f"the model's chat template failed on these messages: {e}") from None
