"""The exported runner's draft sources (``decograph.exported``), one per row, plain Python.

Each source proposes a *chain*: guessed tokens that follow the row's pending token, laid out
right after it in the cache (a dense causal chain, what keeps the exact graph's verification
bit-identical to one-token decoding). ``Lookahead`` also asks for a *window*: Jacobi rows
placed after the chain, attending to the context, the pending token and themselves only,
whose predictions feed its n-gram pool and are never committed. After the step,
``observe(chain, ok, preds, window_preds)`` shows the source how many chain tokens were
accepted and the model's argmax at the pending token and after each chain (and window) row.

    plan (manifest)                     source
    {"draft": null}                     nothing (greedy)
    ngram / adaptive_ngram              ``Ngram``: what followed the newest earlier match
    jacobi / gauss_seidel_jacobi        ``Jacobi``: last step's predictions past the accepted point
    lookahead                           ``Lookahead``: a pool n-gram verified, a Jacobi window beside it
"""
from __future__ import annotations

from typing import Any

__all__ = ["PLANS", "make_drafts", "Ngram", "Jacobi", "Lookahead", "BUCKETS", "FIRST_PRIOR", "LATER_PRIOR",
           "level", "pool_add"]

PLANS = (None, "ngram", "adaptive_ngram", "jacobi", "gauss_seidel_jacobi", "lookahead")   # plan["draft"]

# ANPD's match levels and priors, and lookahead's pool rule: shared with the torch reference's
# draft sources (``decograph.backends.torch_ref.drafts``), which run the same algorithms on rows
BUCKETS = (1, 2, 3, 4, 5, 8, 16)                      # suffix-match lengths that start each level
FIRST_PRIOR = (0.3, 0.35, 0.4, 0.45, 0.55, 0.7, 0.8)  # prior chance the first drafted token is right
LATER_PRIOR = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)   # ... and each later one, given the one before
POOL_CAP = 16                                         # n-grams kept per first token in lookahead's pool


def level(length: int) -> int:
    """ANPD's match level of a suffix match ``length`` tokens long."""
    return max(i for i, lo in enumerate(BUCKETS) if length >= lo)


def pool_add(pool: dict[int, list[tuple[int, ...]]], gram: tuple[int, ...]) -> None:
    """Lookahead's pool: ``gram``'s continuation, newest last, under its first token."""
    lst = pool.setdefault(gram[0], [])
    if gram[1:] in lst:
        lst.remove(gram[1:])
    lst.append(gram[1:])
    del lst[:-POOL_CAP]


class Ngram:
    """N-gram drafting over one sequence: an incremental index of every n-gram's end positions,
    and (adaptive) per-level acceptance, decayed, that cuts drafts to the length that pays."""

    def __init__(self, plan: dict[str, Any], cost: list[float] | None) -> None:
        self.k, self.max_n, self.min_n = int(plan["k"]), int(plan["max_n"]), int(plan["min_n"])
        self.adaptive = bool(plan.get("adaptive")) and cost is not None
        self.cost = cost or []
        self.where: dict[tuple[int, ...], list[int]] = {}
        self.counts: dict[int, int] = {}
        self.top = -1                                   # the sequence's most frequent token
        self.seen = 0
        self.rates: dict[str, dict[int, list[float]]] = {"first": {}, "later": {}}   # level -> [hits, tries]
        self.level = -1
        self.jacobi: int | None = None      # last step's prediction after a rejected draft (Jacobi's guess)

    def _update(self, seq: list[int]) -> None:
        for end in range(self.seen + 1, len(seq) + 1):
            for n in range(1, min(self.max_n, end) + 1):
                self.where.setdefault(tuple(seq[end - n:end]), []).append(end)
            tok = seq[end - 1]
            self.counts[tok] = self.counts.get(tok, 0) + 1
            if self.counts[tok] > self.counts.get(self.top, 0):
                self.top = tok
        self.seen = len(seq)

    def _match(self, seq: list[int]) -> tuple[int, int] | None:
        """(end, length): the newest earlier occurrence of the longest suffix n-gram, and how far
        back the match really extends (up to 32 tokens). Adaptive drafting also tries 1-grams
        below ``min_n``: their drafts are cut to what pays (one drafted token costs ~10% of a
        forward, the wider forward's extra row in the matrix products)."""
        lowest = 1 if self.adaptive else self.min_n
        for n in range(min(self.max_n, len(seq) - 1), lowest - 1, -1):
            for end in reversed(self.where.get(tuple(seq[-n:]), ())):
                if end < len(seq):
                    length = n
                    while length < 32 and end - length - 1 >= 0 and seq[end - length - 1] == seq[-length - 1]:
                        length += 1
                    return end, length
        return None

    def _rate(self, table: str, level: int, prior: float) -> float:
        hits, tries = self.rates[table].get(level, (0.0, 0.0))
        return (hits + 2.0 * prior) / (tries + 2.0)

    def _record(self, table: str, level: int, ok: bool) -> None:
        h = self.rates[table].setdefault(level, [0.0, 0.0])
        h[0], h[1] = 0.95 * h[0] + ok, 0.95 * h[1] + 1.0

    def _cost(self, width: int) -> float:
        c = self.cost
        return c[width - 1] if width <= len(c) else c[-1] * width / len(c)

    def propose(self, seq: list[int], budget: int) -> tuple[list[int], list[int]]:
        self._update(seq)
        self.level = -1
        k = min(self.k, budget)
        found = self._match(seq) if k > 0 else None
        if found is None:
            # nothing to copy: when a one-token draft costs nothing (an exact graph's one-token
            # step has a padding row anyway), guess: what the last step predicted after its
            # rejected draft (Jacobi iteration's guess; right ~11% of the time on Spec-Bench
            # prompts), else the sequence's most frequent token (~5%)
            free = self.adaptive and len(self.cost) > 1 and self.cost[1] <= 1.02 * self.cost[0]
            guess = self.jacobi if self.jacobi is not None else self.top
            return ([guess] if k > 0 and free and guess >= 0 else []), []
        end, length = found
        chain = seq[end:end + k]
        lv = level(length)
        if self.adaptive:
            first = self._rate("first", lv, FIRST_PRIOR[lv])
            later = self._rate("later", lv, LATER_PRIOR[lv])
            best, best_ratio, expected, chance = 0, 1.0 / self._cost(1), 1.0, 1.0
            for i in range(len(chain)):
                chance *= first if i == 0 else later
                expected += chance
                if expected / self._cost(i + 2) > best_ratio:
                    best, best_ratio = i + 1, expected / self._cost(i + 2)
            chain = chain[:best]
            if not chain:
                for table in self.rates.values():           # unused: drift back to the prior
                    if lv in table:
                        table[lv][0] *= 0.97
                        table[lv][1] *= 0.97
                return [], []
        self.level = lv
        return chain, []

    def observe(self, chain: list[int], ok: int, preds: list[int], window_preds: list[int]) -> None:
        self.jacobi = preds[ok + 1] if ok < len(chain) else None
        if self.level < 0 or not chain:
            return
        self._record("first", self.level, ok >= 1)
        for i in range(1, min(ok + 1, len(chain))):
            self._record("later", self.level, i < ok)


class Jacobi:
    """Jacobi iteration (Santilli et al., 2023): the chain is the previous step's predictions
    past the accepted point, its tail filled by repeating the last guess (``init`` repeat) or
    the pending token (pad). With ``block`` (Gauss-Seidel-Jacobi), the window is the unsolved
    rest of a block of ``block`` tokens, and each block starts from a fresh guess."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.window, self.block = int(plan.get("window") or 0), int(plan.get("block") or 0)
        self.init = plan.get("init", "repeat")
        self.guess: list[int] = []
        self.end = -1                   # Gauss-Seidel: where the current block ends

    def propose(self, seq: list[int], budget: int) -> tuple[list[int], list[int]]:
        w = self.window
        if self.block:
            if self.end < 0 or self.end - len(seq) <= 0:
                self.end, self.guess = len(seq) + self.block, []
            w = self.end - len(seq)
        w = min(w, budget)
        if w <= 0:
            return [], []
        guess = self.guess[:w]
        fill = guess[-1] if guess and self.init == "repeat" else seq[-1]
        return guess + [fill] * (w - len(guess)), []

    def observe(self, chain: list[int], ok: int, preds: list[int], window_preds: list[int]) -> None:
        self.guess = preds[ok + 1:] if chain else []


class Lookahead:
    """Lookahead decoding (Fu et al., 2024) in the exact graph's form: the pool's newest n-gram
    that starts at the pending token is the verified chain (one candidate, right after the
    pending token); a Jacobi window of ``window`` guesses sits after it, attending to the
    context and the pending token only; every step's predictions (window and chain) feed the
    pool of ``n``-grams. With nothing in the pool, the window itself is the verified chain."""

    def __init__(self, plan: dict[str, Any]) -> None:
        self.n, self.window = int(plan["n"]), int(plan["window"])
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.seen = 0
        self.guess: list[int] = []
        self.root = -1
        self.jacobi_chain = False

    def propose(self, seq: list[int], budget: int) -> tuple[list[int], list[int]]:
        n = self.n
        for s in range(max(0, self.seen - n + 1), len(seq) - n + 1):
            pool_add(self.pool, tuple(seq[s:s + n]))
        self.seen, self.root = len(seq), seq[-1]
        w = min(self.window, budget)
        guess = self.guess[:w]
        window = guess + [guess[-1] if guess else seq[-1]] * (w - len(guess)) if w > 0 else []
        grams = self.pool.get(seq[-1], [])
        chain = list(grams[-1][:budget]) if grams and budget > 0 else []
        self.jacobi_chain = not chain
        return (window, []) if self.jacobi_chain else (chain, window)

    def observe(self, chain: list[int], ok: int, preds: list[int], window_preds: list[int]) -> None:
        committed = ok + 1
        jac = preds if self.jacobi_chain else [preds[0]] + window_preds
        self.guess = jac[committed:] if len(jac) > 1 else []
        for pred in ([preds] + ([[preds[0]] + window_preds] if window_preds else [])):
            g = [self.root] + pred
            for s in range(0, len(g) - self.n + 1):
                pool_add(self.pool, tuple(g[s:s + self.n]))


def make_drafts(plan: dict[str, Any], cost: list[float] | None) -> Any:
    """A fresh source for one row, from the manifest's plan (``None``: greedy)."""
    kind = plan.get("draft")
    if not kind:
        return None
    if kind in ("ngram", "adaptive_ngram"):
        return Ngram(plan, cost if plan.get("adaptive") else None)
    if kind in ("jacobi", "gauss_seidel_jacobi"):
        return Jacobi(plan)
    if kind == "lookahead":
        return Lookahead(plan)
    raise ValueError(f"plan draft {kind!r} is not one of {PLANS}")
