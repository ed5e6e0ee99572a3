"""``decograph bench``'s tables: per task and overall, as JSON, Markdown and a PNG chart.

Per task, for each system: tokens/s (all new tokens over all seconds, each prompt's seconds the
median of its repetitions), the speedup over Hugging Face greedy, new tokens per decode forward
(for a speculative method: the accepted draft tokens plus the model's own token, per step),
forward passes per new token (the prefill included), milliseconds of drafting per decode step
(the cost of a draft step: a draft head's calls included), and how many outputs equal the reference.
The overall row adds the mean of the per-task speedups (every task weighs the same).
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence

from decograph.files import plain_permissions

__all__ = ["summarize", "markdown", "write_outputs", "write_chart"]


def _cell(sel: list[tuple[Any, Any]]) -> dict[str, Any]:
    """``sel``: (Measured, identical-or-None) pairs of one system over some prompts."""
    toks = sum(len(m.tokens) for m, _ in sel)
    secs = sum(m.seconds for m, _ in sel)
    reps = min(len(m.outcomes) for m, _ in sel)
    per_rep = [toks / sum(m.outcomes[k].seconds for m, _ in sel) for k in range(reps)]
    fwd = [m.outcomes[0].forwards for m, _ in sel]
    dec = [m.outcomes[0].decode_forwards for m, _ in sel]
    known = all(f is not None for f in fwd) and toks > 0
    drafting = [m.outcomes[0].draft_seconds for m, _ in sel]
    same = [s for _, s in sel if s is not None]
    return {
        "prompts": len(sel), "new_tokens": toks, "seconds": secs,
        "tokens_per_s": toks / secs if secs > 0 else 0.0,
        "per_rep_tokens_per_s": per_rep,
        "tokens_per_forward": toks / sum(dec) if known and sum(dec) else None,   # type: ignore[arg-type]
        "forwards_per_token": sum(fwd) / toks if known else None,               # type: ignore[arg-type]
        "draft_ms_per_step": (1e3 * sum(drafting) / sum(dec)                    # type: ignore[arg-type]
                              if known and sum(dec) and all(d is not None for d in drafting) else None),
        "identical": sum(same) if same else None, "checked": len(same),
        "stable": all(m.stable for m, _ in sel),
    }


def summarize(results: Sequence[dict[str, Any]], tasks: Sequence[str], systems: Sequence[str],
              identical: Sequence[dict[str, bool | None]], baseline: str = "hf_greedy") -> dict[str, dict[str, Any]]:
    """``{task or "overall": {system: cell}}``; ``identical[i][system]``: prompt i's output
    equals the reference (None: not compared)."""
    out: dict[str, dict[str, Any]] = {}
    for task in list(dict.fromkeys(tasks)) + ["overall"]:
        idx = [i for i, t in enumerate(tasks) if task == "overall" or t == task]
        out[task] = {s: _cell([(results[i][s], identical[i].get(s)) for i in idx]) for s in systems}
        base = out[task][baseline]["tokens_per_s"]
        for s in systems:
            out[task][s]["speedup"] = out[task][s]["tokens_per_s"] / base if base else 0.0
    per_task = [t for t in out if t != "overall"]
    for s in systems:
        out["overall"][s]["mean_task_speedup"] = statistics.mean(out[t][s]["speedup"] for t in per_task)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def markdown(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The per-task tables and the overall one, as Markdown."""
    lines = [f"{meta['model']}, {meta['prompt_set']}, {meta['prompts']} prompts, {meta['max_new_tokens']} new tokens, "
             f"{meta['threads']} threads, backend {meta['backend']}, median of {meta['reps']} repetition(s) per prompt, "
             f"systems interleaved; reference for the lossless check: {meta['reference']}.", ""]
    head = ("| system | tokens/s | speedup vs HF greedy | tokens/forward | forwards/token | draft ms/step "
            "| same as reference |\n|---|---|---|---|---|---|---|")
    order = ["overall"] + [t for t in table if t != "overall"]
    for task in order:
        n = next(iter(table[task].values()))["prompts"]
        lines += [f"### {task} ({n} prompt{'s' if n != 1 else ''})", "", head]
        for s, c in table[task].items():
            tps = f"{c['tokens_per_s']:.1f}"
            if task == "overall" and len(c["per_rep_tokens_per_s"]) > 1:
                tps += f" [{min(c['per_rep_tokens_per_s']):.1f}-{max(c['per_rep_tokens_per_s']):.1f}]"
            speed = f"{c['speedup']:.2f}x"
            if task == "overall":
                speed += f" (task mean {c['mean_task_speedup']:.2f}x)"
            same = "—" if c["identical"] is None else f"{c['identical']}/{c['checked']}"
            if not c["stable"]:
                same += " (output changed between repetitions)"
            lines.append(f"| {s} | {tps} | {speed} | {_f(c['tokens_per_forward'], '.2f')} | "
                         f"{_f(c['forwards_per_token'], '.3f')} | {_f(c.get('draft_ms_per_step'), '.2f')} | {same} |")
        lines.append("")
    if meta.get("unavailable"):
        lines.append("Not measured: " + "; ".join(f"{k} ({v})" for k, v in meta["unavailable"].items()) + ".")
        lines.append("")
    lines.append("tokens/s over all prompts ([slowest-fastest repetition]); tokens/forward: new tokens per decode "
                 "forward; forwards/token: forward passes (prefill included) per new token; draft ms/step: "
                 "milliseconds of drafting (a draft head's calls included) per decode step; — : not reported by "
                 "that system.")
    return "\n".join(lines) + "\n"


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the permissions a plain ``open`` would (mkstemp makes it 0600)
    and move it into place."""
    plain_permissions(tmp)
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_chart(table: dict[str, dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """A grouped bar chart of the speedup over HF greedy per task, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in table if t != "overall"] + ["overall"]
    systems = list(table["overall"])
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(tasks) + 2), 4.2), dpi=120)
    for k, s in enumerate(systems):
        vals = [table[t][s]["speedup"] for t in tasks]
        xs = [i + (k - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        bars = ax.bar(xs, vals, width, label=s)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_ylabel("speedup vs Hugging Face greedy")
    ax.set_title(f"{meta['model']}: {meta['max_new_tokens']} new tokens, {meta['prompts']} prompts, "
                 f"{meta['threads']} threads", fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(systems)), loc="upper left")
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)


def write_outputs(out_dir: Path, table: dict[str, dict[str, Any]], meta: dict[str, Any],
                  rows: list[dict[str, Any]]) -> dict[str, Path]:
    """``bench.json`` (settings, per-prompt rows, tables), ``bench.md`` and ``bench.png`` in
    ``out_dir``; each file is written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "markdown": out_dir / "bench.md", "chart": out_dir / "bench.png"}
    md = markdown(table, meta)
    _atomic_write(paths["json"], json.dumps({"meta": meta, "table": table, "rows": rows}, indent=1).encode())
    _atomic_write(paths["markdown"], md.encode())
    write_chart(table, meta, paths["chart"])
    return paths
