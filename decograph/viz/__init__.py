"""``decograph viz``: an HTML report of one generation, after the DDGviz of Santilli et al.
(Accelerating Transformer Inference for Translation via Parallel Decoding, 2023).

    decograph viz --strategy anpd --prompt "Write a haiku." -o report.html

    from decograph.viz import visualize, render_report
    path = visualize("Write a haiku.", strategy="anpd", max_new_tokens=32)

The report is one self-contained file (inline CSS, JS and SVG; no network): per iteration the
tokens drafted, accepted and committed, the decoding dependency graph, the acceptance length
over time, the run's ``Stats``, and the strategy's IR before and after the passes.

Only the standard library is imported here: the CLI builds its parser from ``add_parser``
without loading torch, which ``visualize`` imports when it runs.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "render_report", "visualize", "write_atomic"]


def render_report(result: Any, strategy_program: Any, optimized_program: Any, tokenizer: Any, *,
                  model_name: str, prompt: str | list[int], strategy_name: str | None = None,
                  passes: str = "default") -> str:
    """The report's HTML for ``result`` of ``generate(..., trace=True)``; see ``decograph.viz.report``."""
    from decograph.viz.report import render_report as render

    return render(result, strategy_program, optimized_program, tokenizer, model_name=model_name, prompt=prompt,
                  strategy_name=strategy_name, passes=passes)


def _check_out(out: str | os.PathLike[str]) -> Path:
    """``out`` as a path whose directory exists and is writable (checked before any decoding)."""
    from decograph.errors import InputError

    path = Path(out)
    if not str(out) or path.is_dir():
        raise InputError(f"out: {str(out)!r} is a directory or empty; give the path of an .html file to write")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"out: cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"out: cannot write {path}: directory {parent} is not writable")
    return path


def write_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and a
    rename, so ``path`` is either its old self or complete. ``InputError`` if it cannot be written."""
    from decograph.errors import InputError
    from decograph.files import plain_permissions

    target = _check_out(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        plain_permissions(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise InputError(f"out: cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _model(model: Any, tokenizer: Any) -> tuple[Any, Any, str]:
    if model is None or isinstance(model, (str, os.PathLike)):
        from decograph.apps.loading import load_model

        return load_model(None if model in (None, "default") else os.fspath(model))
    from decograph.api import resolve_model

    adapter, tok = resolve_model(model, tokenizer)
    config = getattr(model, "config", None)
    return adapter, tok, str(getattr(config, "name_or_path", "") or type(model).__name__)


def _visualize(prompt: Any, strategy: Any, model: Any, max_new_tokens: int, chat: bool | None,
               overrides: dict[str, Any] | None, passes: str, out: Any, tokenizer: Any = None) -> tuple[Path, Any]:
    from decograph.errors import InputError

    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("prompt: empty; give the text to decode")
    elif not (isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt)):
        raise InputError(f"prompt: expected text or a non-empty list of token ids, got {prompt!r:.60}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens: must be an int >= 0, got {max_new_tokens!r}")
    path = _check_out(out)
    from decograph.api import generate, optimize
    from decograph.frontends.strategies import load_strategy

    loaded = load_strategy(strategy, overrides=overrides) if isinstance(strategy, (str, os.PathLike)) else strategy
    program = getattr(loaded, "program", loaded)
    adapter, tok, model_name = _model(model, tokenizer)
    use_chat = (model is None) if chat is None else chat
    use_chat = use_chat and isinstance(prompt, str)
    if use_chat and not getattr(tok, "chat_template", None):
        raise InputError(f"chat: the tokenizer of {model_name} has no chat template; use --no-chat (chat=False)")
    optimized = optimize(program, adapter, passes)      # the program generate runs, shown as run
    [result] = generate(adapter, tok, [prompt], optimized, max_new_tokens, chat=use_chat, passes="none", trace=True)
    html = render_report(result, program, optimized, tok, model_name=model_name, prompt=prompt,
                         strategy_name=getattr(loaded, "name", None) or program.name, passes=passes or "none")
    return write_atomic(path, html), result


def visualize(prompt: str | list[int], strategy: Any = "anpd", model: Any = None, max_new_tokens: int = 64,
              chat: bool | None = None, overrides: dict[str, Any] | None = None, passes: str = "default",
              out: str | os.PathLike[str] = "decograph-viz.html", tokenizer: Any = None) -> Path:
    """Decode ``prompt`` with ``strategy`` (a built-in name, a strategy file, a ``Strategy`` or a
    ``Program``) on ``model`` (None: the embedded default model; a directory; ``"mdm"``; or a
    model/adapter object with ``tokenizer``) and write the report to ``out``; returns its path.

    ``chat`` (default: on for the default model) wraps the prompt in the chat template;
    ``passes`` is the pass pipeline. Raises ``InputError`` (a ``DecographError``) naming the
    field for an empty prompt, a bad budget or an unwritable ``out``, ``StrategyFileError`` for
    an unknown strategy; ``out`` is written atomically and only after decoding succeeded.
    """
    return _visualize(prompt, strategy, model, max_new_tokens, chat, overrides, passes, out, tokenizer)[0]


def _cmd_viz(args: argparse.Namespace) -> int:
    from decograph.errors import InputError
    from decograph.frontends.overrides import parse_overrides

    if args.max_new_tokens < 0:
        raise InputError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise InputError("--prompt is empty; give the text to decode")
    path, result = _visualize(args.prompt, args.strategy, args.model, args.max_new_tokens, args.chat,
                              parse_overrides(args.set), args.passes, args.out)
    s = result.stats
    print(path)
    print(f"[{args.strategy}] {s.new_tokens} tokens in {s.decode_steps} decode steps "
          f"({s.tokens_per_forward:.2f} tokens/forward, {s.mean_accepted:.2f} accepted/step), "
          f"finish: {s.finish_reason}; report: {path}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``viz`` on ``sub`` (an argparse subparsers object); its ``func`` returns the exit status."""
    v = sub.add_parser("viz", help="write an HTML report of one generation (drafts, acceptance, dependency graph, IR)",
                       description="Decode one prompt and write a self-contained HTML report: per iteration the "
                                   "tokens drafted, accepted and committed, the decoding dependency graph, the "
                                   "acceptance length per iteration, the statistics, and the strategy's IR before "
                                   "and after the passes. Prints the file's path.")
    v.add_argument("--strategy", required=True, metavar="NAME_OR_FILE",
                   help="a built-in name (see `decograph strategies`) or a strategy file")
    v.add_argument("--prompt", required=True, metavar="TEXT")
    v.add_argument("--model", metavar="MODEL", help="a local Hugging Face causal-LM or masked-diffusion model "
                   "directory, a packaged model's name, a Hugging Face Hub id org/name[@revision], or 'mdm' for "
                   "the model `decograph train-mdm` trained (default: embedded model)")
    v.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    v.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap the prompt in the chat template; default: on for the embedded default model")
    v.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a strategy parameter (VALUE parsed as bool, int, float or string); repeatable")
    v.add_argument("--passes", default="default", metavar="PIPELINE",
                   help="the pass pipeline: 'default', 'none' or e.g. 'mask-fusion,cache-reuse'")
    v.add_argument("-o", "--out", default="decograph-viz.html", metavar="FILE",
                   help="the HTML file to write (default: decograph-viz.html)")
    v.set_defaults(func=_cmd_viz)
    return v
