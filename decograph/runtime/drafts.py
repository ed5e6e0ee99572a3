"""Draft sources, one class per ``draft.*`` op: the one implementation every backend runs.

A source proposes, per row, chains of guessed tokens following the row's root (its last
committed token); ``limit`` caps every chain (the row's remaining budget minus the bonus
token). After the step's verification, ``observe`` shows the source its own nodes' greedy
predictions and how many tokens the row committed, so that iterative sources (Jacobi,
Gauss-Seidel-Jacobi, the lookahead pool, adaptive lengths) can update their memory, which
lives in ``row.scratch[id(op)]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from decograph.errors import UnsupportedError
from decograph.ir import ops as O
from decograph.runtime.heads import HeadDraft
from decograph.runtime.rows import Row
from decograph.runtime.source import DraftSource

__all__ = ["make_source", "ModelDraft", "DraftSource", "SOURCES", "BUCKETS", "FIRST_PRIOR", "LATER_PRIOR",
           "match_level", "pool_add"]

# ANPD's match levels and priors, and lookahead's pool rule
BUCKETS = (1, 2, 3, 4, 5, 8, 16)                      # suffix-match lengths that start each level
FIRST_PRIOR = (0.3, 0.35, 0.4, 0.45, 0.55, 0.7, 0.8)  # prior chance the first drafted token is right
LATER_PRIOR = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)   # ... and each later one, given the one before
GUESS = 0.11                                          # a guessed token's chance when nothing matches (see below)
POOL_CAP = 16                                         # n-grams kept per first token in lookahead's pool


def match_level(length: int) -> int:
    """ANPD's match level of a suffix match ``length`` tokens long."""
    return max(i for i, lo in enumerate(BUCKETS) if length >= lo)


def pool_add(pool: dict[int, list[tuple[int, ...]]], gram: tuple[int, ...]) -> None:
    """Lookahead's pool: ``gram``'s continuation, newest last, under its first token."""
    lst = pool.setdefault(gram[0], [])
    if gram[1:] in lst:
        lst.remove(gram[1:])
    lst.append(gram[1:])
    del lst[:-POOL_CAP]


class Jacobi(DraftSource):
    """Fixed-point (Jacobi) iteration over a sliding window (Santilli et al., 2023).

    The guess for the next window is the previous forward's predictions past the accepted
    point; the window's tail is filled by repeating the last guess (``init=repeat``) or with
    the root token (``init=pad``).
    """

    def window(self, row: Row, mem: Any) -> int:
        return int(self.op.window)

    def fresh(self, row: Row) -> Any:
        return {"guess": []}

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        mem = self.memory(row)
        w = min(self.window(row, mem), limit)
        if w <= 0:
            return []
        guess = mem["guess"][:w]
        fill = guess[-1] if guess and self.op.init == "repeat" else row.tokens[-1]
        return [guess + [fill] * (w - len(guess))]

    def observe(self, row: Row, chains: list[list[int]], preds: list[list[int]], committed: int) -> None:
        mem = self.memory(row)
        mem["guess"] = preds[0][committed:] if chains else []


class GaussSeidelJacobi(Jacobi):
    """Jacobi iteration inside fixed blocks of ``block`` tokens, solved one after another.

    The window is the unsolved rest of the current block; once the block is committed the
    next block starts from a fresh guess (Santilli et al.'s GS-Jacobi hybrid).
    """

    def fresh(self, row: Row) -> Any:
        return {"guess": [], "end": len(row.tokens) + int(self.op.block)}

    def window(self, row: Row, mem: Any) -> int:
        left = mem["end"] - len(row.tokens)
        if left <= 0:
            mem["end"] = len(row.tokens) + int(self.op.block)
            mem["guess"] = []
            left = int(self.op.block)
        return left


class NgramIndex:
    """Incremental index: n-gram (as a tuple) -> end positions where it occurred, newest last."""

    def __init__(self, max_n: int) -> None:
        self.max_n = max_n
        self.seen = 0
        self.where: dict[tuple[int, ...], list[int]] = {}

    def update(self, tokens: list[int]) -> None:
        for end in range(self.seen + 1, len(tokens) + 1):
            for n in range(1, self.max_n + 1):
                if end - n >= 0:
                    self.where.setdefault(tuple(tokens[end - n : end]), []).append(end)
        self.seen = len(tokens)


class Ngram(DraftSource):
    """Prompt lookup: copy what followed the newest earlier occurrence of the longest suffix n-gram."""

    def fresh(self, row: Row) -> Any:
        return NgramIndex(int(self.op.max_n))

    def longest(self) -> int:
        return int(self.op.k)

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        k = min(int(self.op.k), limit)
        if k <= 0:
            return []
        index: NgramIndex = self.memory(row)
        toks = row.tokens
        index.update(toks)
        return [toks[e : e + k] for e, _ in matches(toks, index, int(self.op.max_n), int(self.op.min_n),
                                                     int(self.op.candidates), k)]


def matches(toks: list[int], index: NgramIndex, max_n: int, min_n: int, want: int, k: int) -> list[tuple[int, int]]:
    """Up to ``want`` (end, suffix-match length) pairs whose continuations (``k`` tokens) differ:
    the longest suffix n-gram's newest earlier occurrence first, then older ones and shorter n."""
    out: list[tuple[int, int]] = []
    seen: set[tuple[int, ...]] = set()
    for n in range(max_n, min_n - 1, -1):
        if n > len(toks) - 1:
            continue
        for end in reversed(index.where.get(tuple(toks[-n:]), [])):
            cont = tuple(toks[end : end + k])
            if end >= len(toks) or cont in seen:
                continue
            seen.add(cont)
            length = n
            while length < 32 and end - length - 1 >= 0 and toks[end - length - 1] == toks[-length - 1]:
                length += 1
            out.append((end, length))
            if len(out) >= want:
                return out
    return out


@dataclass
class _Anpd:
    index: NgramIndex
    first: dict[int, list[float]] = field(default_factory=dict)   # level -> [hits, tries], decayed
    later: dict[int, list[float]] = field(default_factory=dict)   # same, for tokens after the first
    level: int = -1                                                # level of the last draft
    counts: dict[int, int] = field(default_factory=dict)          # token -> occurrences in the row
    top: int = -1                                                  # the row's most frequent token
    counted: int = 0
    guess: int | None = None        # last step's prediction after its rejected draft (Jacobi's guess)

    def count(self, toks: list[int]) -> None:
        for tok in toks[self.counted:]:
            self.counts[tok] = self.counts.get(tok, 0) + 1
            if self.counts[tok] > self.counts.get(self.top, 0):
                self.top = tok
        self.counted = len(toks)

    def rate(self, table: dict[int, list[float]], level: int, prior: float) -> float:
        hits, tries = table.get(level, (0.0, 0.0))
        return (hits + 2.0 * prior) / (tries + 2.0)

    def drift(self, level: int) -> None:
        """A level left unused drifts back to its prior, so one that failed early is tried again."""
        for table in (self.first, self.later):
            if level in table:
                table[level][0] *= 0.97
                table[level][1] *= 0.97

    @staticmethod
    def record(table: dict[int, list[float]], level: int, ok: bool) -> None:
        h = table.setdefault(level, [0.0, 0.0])
        h[0], h[1] = 0.95 * h[0] + ok, 0.95 * h[1] + 1.0


class AdaptiveNgram(DraftSource):
    """ANPD (Ou et al., 2024): multi-level n-gram drafting from the context (prompt and
    generated text), the index updated in real time as tokens commit.

    The draft copies what followed the newest earlier occurrence of the longest matching
    suffix n-gram (``min_n``..``max_n`` tokens). Its *level* is how far back that match really
    extends (1, 2, 3, 4, 5-7, 8-15, 16+ tokens): a long match is the model repeating itself,
    a short one a guess. With ``adaptive``, each level's acceptance is tracked per row (first
    token, and each later token given the one before) and the draft is cut to the length with
    the most expected tokens per unit of forward cost, from the model's measured cost curve,
    so multi-token forwards, which are far from free on a CPU, go to drafts that pay. Levels
    left unused drift back to their prior, so a level that failed early is tried again.

    With nothing to copy, and where the backend says a one-token draft costs nothing (the cost
    curve's width 2 within 2% of width 1: an exact ONNX graph's one-token step computes a
    padding row anyway), it drafts one guessed token: what the last step predicted after its
    rejected draft (Jacobi's guess; right ~11% of the time on Spec-Bench prompts), else the
    row's most frequent token (~5%).
    """

    FIRST, LATER = FIRST_PRIOR, LATER_PRIOR          # each level's prior acceptance

    def fresh(self, row: Row) -> Any:
        return _Anpd(NgramIndex(int(self.op.max_n)))

    def longest(self) -> int:
        return int(self.op.k)

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        mem: _Anpd = self.memory(row)
        toks = row.tokens
        mem.index.update(toks)
        mem.level = -1
        k = min(int(self.op.k), limit)
        found = matches(toks, mem.index, int(self.op.max_n), int(self.op.min_n), int(self.op.candidates), k) \
            if k > 0 else []
        if not found:
            if self.op.adaptive and k > 0 and self.step_cost(2) <= 1.02 * self.step_cost(1):
                mem.count(toks)
                guess = mem.guess if mem.guess is not None else mem.top
                return [[guess]] if guess >= 0 else []
            return []
        end, length = found[0]
        chain = toks[end : end + k]
        level = match_level(length)
        if self.op.adaptive:
            chain = chain[: self._best_length(mem, level, len(chain), len(row.pending))]
            if not chain:
                mem.drift(level)
                return []
        mem.level = level
        return [chain] + self._alternates(toks, found[1:], chain, len(row.pending))

    def _alternates(self, toks: list[int], found: list[tuple[int, int]], chain: list[int], pending: int) -> list[list[int]]:
        """Other matches' continuations, trimmed to the query slots the forward has spare:
        it is padded to the cheapest width anyway, so they ride along at no extra cost."""
        spare = self.cost.best_width(pending + len(chain)) - pending - len(chain)
        out, used = [], [chain]
        for end, _ in found:
            if spare <= 0:
                break
            alt = toks[end : end + len(chain)]
            shared = max(_common(alt, u) for u in used)     # nodes the trie already has
            alt = alt[: shared + spare]
            if len(alt) > shared:
                out.append(alt)
                used.append(alt)
                spare -= len(alt) - shared
        return out

    def expected(self, row: Row, chain: list[int]) -> float:
        """Its rates' expected tokens for ``chain``; a guessed token (no match): ``GUESS``."""
        mem: _Anpd = self.memory(row)
        if mem.level < 0:
            return GUESS * min(1, len(chain))
        first = mem.rate(mem.first, mem.level, self.FIRST[mem.level])
        later = mem.rate(mem.later, mem.level, self.LATER[mem.level])
        return sum(first * later ** i for i in range(len(chain)))

    def _best_length(self, mem: _Anpd, level: int, longest: int, pending: int) -> int:
        """The draft length with the most expected tokens per unit of forward cost."""
        first = mem.rate(mem.first, level, self.FIRST[level])
        later = mem.rate(mem.later, level, self.LATER[level])
        best, best_ratio = 0, 1.0 / self.step_cost(pending)
        expected, chance = 1.0, 1.0
        for i in range(longest):
            chance *= first if i == 0 else later
            expected += chance
            ratio = expected / self.step_cost(pending + i + 1)
            if ratio > best_ratio:
                best, best_ratio = i + 1, ratio
        return best

    def observe(self, row: Row, chains: list[list[int]], preds: list[list[int]], committed: int) -> None:
        mem: _Anpd = self.memory(row)
        accepted = min(committed - 1, _common(chains[0], row.tokens[len(row.tokens) - committed:])) if chains else 0
        mem.guess = preds[0][accepted + 1] if chains and accepted < len(chains[0]) else None
        if not chains or mem.level < 0:
            return
        drafted = len(chains[0])
        mem.record(mem.first, mem.level, accepted >= 1)
        for i in range(1, min(accepted + 1, drafted)):
            mem.record(mem.later, mem.level, i < accepted)


class CorpusDraft(AdaptiveNgram):
    """``draft.corpus``: retrieval from a corpus of the model's own answers (``Corpus.lookup``:
    the longest suffix of the context it contains, ``max_n`` .. ``min_n`` tokens, and its
    occurrences' most common continuation). A match's level is its length (2 .. 8 tokens), each
    level's acceptance tracked per row and the draft cut to the length that pays, as ANPD's.
    The priors are measured on held-out answers of the default model (first token right 26% of
    the time after a 2-token match, 64% after 8; each later one 42-69%). In a tree its chain
    rides beside the other drafts'; a chain-only backend verifies whichever draft expects the
    most tokens (``expected``)."""

    FIRST = (0.15, 0.25, 0.35, 0.4, 0.45, 0.5, 0.55, 0.65)       # by match length - 1
    LATER = (0.4, 0.45, 0.5, 0.55, 0.6, 0.6, 0.65, 0.7)

    def __init__(self, op: O.Op, corpus: Any) -> None:
        super().__init__(op)
        self.corpus = corpus

    def fresh(self, row: Row) -> Any:
        return _Anpd(NgramIndex(1))

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        mem: _Anpd = self.memory(row)
        mem.level = -1
        k = min(int(self.op.k), limit)
        if k <= 0:
            return []
        found = self.corpus.lookup(row.tokens, k, int(self.op.max_n), int(self.op.min_n))
        if not found.tokens:
            return []
        level = min(found.n, len(self.FIRST)) - 1
        chain = found.tokens[: self._best_length(mem, level, len(found.tokens), len(row.pending))]
        if not chain:
            mem.drift(level)
            return []
        mem.level = level
        return [chain]



def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


class NgramPool(DraftSource):
    """Lookahead decoding's n-gram pool (Fu et al., 2024), keyed by first token.

    Filled from the committed text and from each step's Jacobi-style predictions; proposes up
    to ``candidates`` newest n-grams that start at the root token.
    """

    observes_all = True

    def fresh(self, row: Row) -> Any:
        return {"pool": {}, "seen": 0}

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        mem = self.memory(row)
        n, toks = int(self.op.n), row.tokens
        for s in range(max(0, mem["seen"] - n + 1), len(toks) - n + 1):
            pool_add(mem["pool"], tuple(toks[s : s + n]))
        mem["seen"] = len(toks)
        grams = mem["pool"].get(toks[-1], [])[::-1][: int(self.op.candidates)]
        return [list(g[:limit]) for g in grams if limit > 0]

    def observe(self, row: Row, chains: list[list[int]], preds: list[list[int]], committed: int) -> None:
        n, pool = int(self.op.n), self.memory(row)["pool"]
        root = row.tokens[-committed - 1]
        for pred in preds:
            seq = [root] + pred
            for s in range(0, len(seq) - n + 1):
                pool_add(pool, tuple(seq[s : s + n]))


SOURCES: dict[type[O.Op], type[DraftSource]] = {
    O.DraftJacobi: Jacobi,
    O.DraftGaussSeidelJacobi: GaussSeidelJacobi,
    O.DraftNgram: Ngram,
    O.DraftAdaptiveNgram: AdaptiveNgram,
    O.DraftNgramPool: NgramPool,
}


class ModelDraft(DraftSource):
    """``draft.model``: a smaller causal LM sharing the target's vocabulary proposes ``k``
    tokens greedily. The model runs on a backend's *draft runner* (``greedy(state, tokens, k)``:
    bring the row's draft cache up to ``tokens``, return ``k`` greedy tokens after them and cut
    the cache back; ``new_state()``: an empty per-row cache), so drafted tokens never stay."""

    def __init__(self, op: O.Op, runner: Any) -> None:
        super().__init__(op)
        self.runner = runner

    def fresh(self, row: Row) -> Any:
        return self.runner.new_state()

    def longest(self) -> int:
        return int(self.op.k)

    def propose(self, row: Row, limit: int) -> list[list[int]]:
        k = min(int(self.op.k), limit)
        if k <= 0:
            return []
        return [list(self.runner.greedy(self.memory(row), row.tokens, k))]


def make_source(op: O.Op, draft_models: dict[str, Any], draft_heads: dict[str, Any] | None = None,
                corpora: dict[str, Any] | None = None) -> DraftSource:
    """The runtime source for a draft op (raises ``UnsupportedError`` naming the op);
    ``draft_models``: name -> the backend's draft runner for ``draft.model(model=NAME)``;
    ``draft_heads``: head name -> a head runner for ``draft.head(head=NAME)``; ``corpora``:
    corpus name -> a corpus (``decograph.heads.corpus.Corpus``) for ``draft.corpus(corpus=NAME)``."""
    if isinstance(op, O.DraftCorpus):
        if op.corpus not in (corpora or {}):
            raise UnsupportedError(
                f"draft.corpus(corpus={op.corpus}) has no corpus: decograph.generate loads the model's (`decograph "
                f"train-draft` writes one), or name a corpus file with corpus=PATH"
            )
        return CorpusDraft(op, (corpora or {})[op.corpus])
    if isinstance(op, O.DraftModel):
        if op.model not in draft_models:
            raise UnsupportedError(
                f"draft.model(model={op.model}) needs a draft model: pass draft_models={{'{op.model}': model}}"
            )
        return ModelDraft(op, draft_models[op.model])
    if isinstance(op, O.DraftHead):
        if op.head not in (draft_heads or {}):
            raise UnsupportedError(
                f"draft.head(head={op.head}) has no head runner: decograph.generate binds the model's head "
                f"(train one with `decograph train-draft`), or pass draft_heads={{'{op.head}': runner}}"
            )
        return HeadDraft(op, (draft_heads or {})[op.head])
    cls = SOURCES.get(type(op))
    if cls is None:
        raise UnsupportedError(
            f"{op.NAME} needs a masked-diffusion model (unmask strategies), the model is a causal LM"
        )
    return cls(op)
