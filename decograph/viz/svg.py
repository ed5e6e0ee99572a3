"""Inline SVG for the report: the decoding dependency graph and the acceptance chart.

Both are plain strings of SVG markup with every text escaped, and carry data attributes
(``data-pos``, ``data-col``, ``data-step``) the page's script and tests read.

The decoding dependency graph (after Santilli et al. 2023's DDGviz): column ``c`` holds the
tokens iteration ``c`` committed, one row per generated position; each token has an arrow to
the token it waited for. For a causal strategy that is the token before it, so a vertical run
in one column is parallel acceptance and an arrow into an earlier column is the sequential
dependency between iterations. For a masked-diffusion strategy it is the nearest position
already decoded in an earlier step.
"""
from __future__ import annotations

from html import escape

from decograph.viz.view import Iteration, View

__all__ = ["shown", "ddg_svg", "acceptance_svg"]

_CW, _RH, _NW, _NH = 72, 20, 64, 16           # column width, row height, node width, node height
_LEFT, _TOP = 52, 34


def shown(text: str, limit: int = 0) -> str:
    """A token's text with whitespace made visible (space ·, newline ↵, tab ⇥), cut to
    ``limit`` characters (0: no cut); not escaped."""
    out = text.replace(" ", "\u00b7").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
    out = out or "\u2205"
    return out[: limit - 1] + "\u2026" if limit and len(out) > limit else out


def _x(col: int) -> int:
    return _LEFT + col * _CW


def _y(row: int) -> int:
    return _TOP + row * _RH


def _edge(sx: int, sy: int, tx: int, ty: int, cls: str, pos: int) -> str:
    if sx == tx:                                # same column: straight up to the node above
        d = f"M{sx + _NW // 2},{sy} L{tx + _NW // 2},{ty + _NH}"
    else:                                       # into an earlier column
        ax, ay, bx, by = sx, sy + _NH // 2, tx + _NW, ty + _NH // 2
        mid = (ax + bx) // 2
        d = f"M{ax},{ay} C{mid},{ay} {mid},{by} {bx},{by}"
    return f'<path class="edge {cls}" data-pos="{pos}" d="{d}" marker-end="url(#ddg-arrow)"/>'


def ddg_svg(view: View) -> str:
    """The decoding dependency graph of ``view`` (prompt node in column 0, iteration ``c`` in
    column ``c + 1``, position ``p`` in row ``p + 1``)."""
    cols = len(view.iterations)
    rows = max((n.pos for n in view.nodes), default=-1) + 2
    width, height = _x(cols + 1) + 8, _y(rows) + 8
    parts = [f'<svg id="ddg-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="decoding dependency graph">',
             '<defs><marker id="ddg-arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" '
             'orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" class="arrow-head"/></marker></defs>']
    for c, it in enumerate(view.iterations):
        label = "join" if it.kind == "join" else str(c + 1)
        parts.append(f'<rect class="col-bg" data-col="{c}" data-step="{it.step}" x="{_x(c + 1) - 6}" y="{_TOP - 22}" '
                     f'width="{_CW}" height="{height - _TOP + 14}"/>')
        parts.append(f'<text class="col-label" x="{_x(c + 1) + _NW // 2}" y="{_TOP - 10}">{escape(label)}</text>')
    parts.append(f'<text class="col-label" x="{_x(0) + _NW // 2}" y="{_TOP - 10}">prefill</text>')
    for p in range(rows - 1):
        parts.append(f'<text class="row-label" x="{_LEFT - 8}" y="{_y(p + 1) + _NH - 4}">{p}</text>')
    at = {n.pos: n for n in view.nodes}
    for n in view.nodes:
        dep = at.get(n.dep)
        sx, sy = _x(n.col + 1), _y(n.pos + 1)
        tx, ty = (_x(dep.col + 1), _y(dep.pos + 1)) if dep is not None else (_x(0), _y(0))
        cls = "same" if dep is not None and dep.col == n.col else "cross"
        parts.append(_edge(sx, sy, tx, ty, cls, n.pos))
    parts.append(f'<g class="node prompt-node"><title>the prompt ({view.prompt_len} tokens)</title>'
                 f'<rect x="{_x(0)}" y="{_y(0)}" width="{_NW}" height="{_NH}" rx="4"/>'
                 f'<text x="{_x(0) + _NW // 2}" y="{_y(0) + _NH - 4}">prompt</text></g>')
    for n in view.nodes:
        it = view.iterations[n.col]
        tip = f"position {n.pos}: {n.tok.text!r} (id {n.tok.id}), iteration {n.col + 1}"
        tip += f"; waits for position {n.dep}" if n.dep >= 0 else "; waits for the prompt"
        parts.append(f'<g class="node" data-pos="{n.pos}" data-col="{n.col}" data-step="{it.step}" '
                     f'data-id="{n.tok.id}" data-state="{escape(n.tok.state)}"><title>{escape(tip)}</title>'
                     f'<rect x="{_x(n.col + 1)}" y="{_y(n.pos + 1)}" width="{_NW}" height="{_NH}" rx="4"/>'
                     f'<text x="{_x(n.col + 1) + _NW // 2}" y="{_y(n.pos + 1) + _NH - 4}">'
                     f'{escape(shown(n.tok.text, 8))}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(top: int) -> list[int]:
    step = 1
    while top / step > 6:
        step = step * 2 if str(step)[0] in "15" else step * 5 // 2
    return list(range(0, top + 1, step))


def _bar(c: int, it: Iteration, x: int, bw: int, scale: float, base: int, diffusion: bool) -> str:
    def rect(cls: str, lo: float, hi: float) -> str:
        return (f'<rect class="{cls}" x="{x}" y="{base - hi * scale:.1f}" width="{bw}" '
                f'height="{max(0.0, (hi - lo) * scale):.1f}"/>')

    committed = len([t for t in it.committed if t.state != "discarded"])
    if diffusion:
        tip = f"step {c + 1}: {it.accepted} unmasked of {it.n_drafted} masked in the block"
        body = rect("drafted", 0, it.n_drafted) + rect("acc", 0, it.accepted)
    else:
        bonus = 1 if any(t.state == "bonus" for t in it.committed) else 0
        tip = (f"iteration {c + 1}: {it.accepted} of {it.n_drafted} drafted accepted, "
               f"{committed} committed{' (incl. the bonus token)' if bonus else ''}")
        body = (rect("drafted", 0, it.n_drafted) + rect("acc", 0, committed - bonus)
                + rect("bonus", committed - bonus, committed))
    return (f'<g class="bar" data-col="{c}" data-step="{it.step}" data-accepted="{it.accepted}" '
            f'data-drafted="{it.n_drafted}" data-committed="{committed}"><title>{escape(tip)}</title>{body}</g>')


def acceptance_svg(view: View) -> str:
    """Per iteration: drafted tokens (outline), accepted drafts and the bonus token (stacked;
    diffusion: masked candidates and positions unmasked), with the mean committed per iteration."""
    its = view.iterations
    diffusion = view.kind == "diffusion"
    n = max(len(its), 1)
    bw = max(4, min(26, 880 // n - 2))
    top = max([1] + [max(it.n_drafted, len(it.committed)) for it in its])
    left, plot_h, pad = 40, 170, 24
    width, height = max(360, left + n * (bw + 2) + pad + 70), plot_h + 2 * pad + 18
    base = pad + plot_h
    scale = plot_h / top
    parts = [f'<svg id="acceptance-svg" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="acceptance length per iteration">']
    for t in _ticks(top):
        y = base - t * scale
        parts.append(f'<line class="grid" x1="{left}" x2="{width - pad}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}">{t}</text>')
    for c, it in enumerate(its):
        parts.append(_bar(c, it, left + c * (bw + 2), bw, scale, base, diffusion))
    if its:
        mean = sum(len([t for t in it.committed if t.state != "discarded"]) for it in its) / len(its)
        y = base - mean * scale
        parts.append(f'<line class="mean" x1="{left}" x2="{width - pad}" y1="{y:.1f}" y2="{y:.1f}"/>'
                     f'<text class="mean-label" x="{width - pad}" y="{y - 4:.1f}">mean {mean:.2f}</text>')
    label = "step" if diffusion else "iteration"
    parts.append(f'<text class="axis-label" x="{left + n * (bw + 2) // 2}" y="{height - 4}">{label} (1 … {len(its)})'
                 f'</text></svg>')
    return "".join(parts)
