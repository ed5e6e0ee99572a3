"""IR values, ops and the op registry.

Every op is one frozen dataclass plus one ``OpDef`` registry entry (its text name, result-type
rule and extra checks). Fields holding ``Value``s are operands (in declaration order; a
``tuple[Value, ...]`` field is variadic and must come last); every other field is a typed
attribute. ``Iterate`` alone carries a region (``body``).

    %0 = draft.jacobi(%s, window=5) : Tokens[B, 5]
    %1 = forward(%s, %0, mask=causal) : Logits[B, 6, V]
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from decograph.ir.base import Block, Op, Value, operand
from decograph.ir.types import Dim, Sym, Type, dim_add, dim_mul

__all__ = [
    "Value", "Block", "Op", "OpDef", "OPS", "op_class", "Program",
    "Prefill", "DraftJacobi", "DraftGaussSeidelJacobi", "DraftNgram", "DraftNgramPool",
    "DraftAdaptiveNgram", "DraftMask", "DraftNoise", "DraftModel", "DraftHead", "DraftCorpus", "DraftBranches",
    "Forward",
    "VerifyGreedy", "VerifySampling", "VerifyThreshold", "UnmaskThreshold", "UnmaskFactor",
    "UnmaskTopkPerStep", "UnmaskEntropyBound", "Commit", "Fork", "Join", "Iterate", "Yield", "Emit",
    "MAX_DRAFT", "MAX_TREE", "DRAFT_OPS", "VERIFY_OPS", "UNMASK_OPS", "MASK_RULES", "NOISE_RULES", "MASKS", "KV_POLICIES", "UNTIL",
    "LAYOUTS", "ROLLBACKS", "JOIN_RULES", "draft_chains",
]

MAX_DRAFT = 64
MAX_TREE = 256         # the most nodes one draft tree may hold (draft.head's ``nodes``)
MASKS = ("causal", "tree", "block", "packed")
JOIN_RULES = ("concat", "collect")        # built in; applications register more by name (NER: ner_dedup)
KV_POLICIES = ("keep_accepted", "recompute", "block_approx", "block_approx_dual")
LAYOUTS = ("sequence", "batch")
ROLLBACKS = ("copy", "in_place")
UNTIL = ("eos", "max_new_tokens", "stop")
B, V = Sym("B"), Sym("V")


@dataclass(frozen=True, eq=False)
class Prefill(Op):
    NAME = "prefill"
    prompt: Value = operand()


@dataclass(frozen=True, eq=False)
class DraftJacobi(Op):
    """Guesses for the next ``window`` tokens: last iteration's predictions (fixed-point iteration)."""
    NAME = "draft.jacobi"
    state: Value = operand()
    window: int = 5
    init: str = "repeat"


@dataclass(frozen=True, eq=False)
class DraftGaussSeidelJacobi(Op):
    """Jacobi iteration inside blocks of ``block`` tokens, blocks solved one after another."""
    NAME = "draft.gauss_seidel_jacobi"
    state: Value = operand()
    block: int = 4
    init: str = "repeat"


@dataclass(frozen=True, eq=False)
class DraftNgram(Op):
    """Prompt lookup: the ``k`` tokens that followed the latest earlier match of the last n-gram
    (with ``candidates`` > 1, the continuations of that many distinct earlier matches)."""
    NAME = "draft.ngram"
    state: Value = operand()
    k: int = 8
    max_n: int = 3
    min_n: int = 1
    candidates: int = 1


@dataclass(frozen=True, eq=False)
class DraftNgramPool(Op):
    """Lookahead's pool: up to ``candidates`` n-grams that start at the current token."""
    NAME = "draft.ngram_pool"
    state: Value = operand()
    n: int = 4
    candidates: int = 5


@dataclass(frozen=True, eq=False)
class DraftAdaptiveNgram(Op):
    """ANPD: multi-level n-gram tables built from the context and updated as tokens commit.

    With ``adaptive``, the draft is cut where one more token is expected to cost more than it
    returns, judged by the model's forward-cost curve and the acceptance seen so far.
    """
    NAME = "draft.adaptive_ngram"
    state: Value = operand()
    k: int = 8
    max_n: int = 4
    min_n: int = 2
    adaptive: bool = True
    candidates: int = 1


@dataclass(frozen=True, eq=False)
class DraftMask(Op):
    """The canvas's current block of ``k`` positions (0: all); ``mask_token`` -1: the model's."""
    NAME = "draft.mask"
    state: Value = operand()
    k: int = 32
    mask_token: int = -1


@dataclass(frozen=True, eq=False)
class DraftNoise(Op):
    """Each row's canvas of ``k`` positions (0: the model's) for uniform-noise block diffusion
    (DiffusionGemma): uniform noise from the backend's generator after each commit, else the
    canvas the last denoising step left."""
    NAME = "draft.noise"
    state: Value = operand()
    k: int = 0


@dataclass(frozen=True, eq=False)
class DraftModel(Op):
    """``k`` tokens proposed by a draft model named ``model`` (passed to the runtime)."""
    NAME = "draft.model"
    state: Value = operand()
    k: int = 4
    model: str = "draft"


@dataclass(frozen=True, eq=False)
class DraftHead(Op):
    """A trained draft head (EAGLE) fed the model's hidden states drafts a token tree of at
    most ``depth`` levels, expanding the ``topk`` most probable nodes per level into ``topk``
    children each (EAGLE-2's dynamic tree), and keeps the best ``nodes`` nodes (0: as many as
    pay, by the cost curve and the acceptance measured). ``head``: a head file, or ``default``."""
    NAME = "draft.head"
    state: Value = operand()
    head: str = "default"
    nodes: int = 0
    depth: int = 6
    topk: int = 8


@dataclass(frozen=True, eq=False)
class DraftCorpus(Op):
    """Retrieval (REST): the most common continuation, in a corpus of the model's own answers,
    of the context's longest suffix found there (``max_n`` .. ``min_n`` tokens), at most ``k``
    tokens, cut as ANPD's adaptive drafts. ``corpus``: a corpus file, or ``default``."""
    NAME = "draft.corpus"
    state: Value = operand()
    corpus: str = "default"
    k: int = 8
    max_n: int = 8
    min_n: int = 2


@dataclass(frozen=True, eq=False)
class DraftBranches(Op):
    """Branch prompts for fork: explicit ``prompts``, the items of the last list in the text
    (lines starting with the regex ``delimiter``), or a run-time ``provider``; each through
    ``template`` ({item}, {i}). Each branch decodes at most ``max_tokens`` (0: the run's budget)."""
    NAME = "draft.branches"
    state: Value = operand()
    prompts: tuple[str, ...] = ()
    delimiter: str = ""
    provider: str = ""
    template: str = "{item}"
    max_branches: int = 8
    max_tokens: int = 0


@dataclass(frozen=True, eq=False)
class Forward(Op):
    """The model over the pending tokens plus every draft candidate chain. ``mask=causal``:
    one causal forward per chain; ``mask=tree``: one forward, chains packed in each row's
    sequence (``layout=sequence``) or as batch rows copying the prefix KV (``layout=batch``).
    ``dedup``: chains sharing a prefix share its nodes (a trie), else each hangs off the root."""
    NAME = "forward"
    state: Value = operand()
    drafts: tuple[Value, ...] = operand(variadic=True)
    mask: str = "causal"
    layout: str = "sequence"
    dedup: bool = False


@dataclass(frozen=True, eq=False)
class VerifyGreedy(Op):
    """Longest draft prefix equal to the argmax, plus the model's next token (lossless)."""
    NAME = "verify.greedy"
    state: Value = operand()
    logits: Value = operand()
    drafts: tuple[Value, ...] = operand(variadic=True)


@dataclass(frozen=True, eq=False)
class VerifySampling(Op):
    """Speculative (rejection) sampling: output distributed exactly as the model's sampling."""
    NAME = "verify.sampling"
    state: Value = operand()
    logits: Value = operand()
    drafts: tuple[Value, ...] = operand(variadic=True)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass(frozen=True, eq=False)
class VerifyThreshold(Op):
    """Accept draft tokens while the model's probability of them is >= ``threshold`` (lossy)."""
    NAME = "verify.threshold"
    state: Value = operand()
    logits: Value = operand()
    drafts: tuple[Value, ...] = operand(variadic=True)
    threshold: float = 0.9


@dataclass(frozen=True, eq=False)
class UnmaskThreshold(Op):
    """Unmask positions with confidence > ``threshold`` (at least one); ``contiguous`` (LUD):
    only the run starting at the first masked position."""
    NAME = "unmask.threshold"
    state: Value = operand()
    logits: Value = operand()
    threshold: float = 0.9
    contiguous: bool = False


@dataclass(frozen=True, eq=False)
class UnmaskFactor(Op):
    """Fast-dLLM's factor rule: unmask the n most confident with (n + 1)(1 - c_n) < ``factor``."""
    NAME = "unmask.factor"
    state: Value = operand()
    logits: Value = operand()
    factor: float = 1.0


@dataclass(frozen=True, eq=False)
class UnmaskTopkPerStep(Op):
    """Unmask the ``k`` most confident masked positions per step (LLaDA's baseline)."""
    NAME = "unmask.topk_per_step"
    state: Value = operand()
    logits: Value = operand()
    k: int = 1


@dataclass(frozen=True, eq=False)
class UnmaskEntropyBound(Op):
    """One denoising step of a uniform-noise canvas (DiffusionGemma's sampler): at temperature
    t_min + (t_max - t_min) r / ``steps`` (r: steps left), a sample per position, kept at the
    lowest-entropy positions while their entropy sum less the largest is <= ``bound``, the rest
    renoised. The argmax is final once it held ``stable`` steps with mean entropy < ``confident``,
    or after ``steps`` steps (``decograph.runtime.denoise``)."""
    NAME = "unmask.entropy_bound"
    state: Value = operand()
    logits: Value = operand()
    bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    steps: int = 48
    stable: int = 1
    confident: float = 0.005


@dataclass(frozen=True, eq=False)
class Commit(Op):
    """Append accepted tokens to the state.

    ``kv``: the accepted drafts' KV is recomputed at the next forward (``recompute``), kept
    (``keep_accepted``), or kept although computed under a block mask (diffusion: Fast-dLLM's
    prefix cache ``block_approx``, dual cache ``block_approx_dual``). ``rollback``: rejected
    slots are copied out (``copy``) or just marked invalid in place (``in_place``).
    """
    NAME = "commit"
    state: Value = operand()
    accepted: Value = operand()
    kv: str = "recompute"
    rollback: str = "copy"


@dataclass(frozen=True, eq=False)
class Fork(Op):
    """Split each row into N branches sharing its prefix KV."""
    NAME = "fork"
    state: Value = operand()
    branches: Value = operand()


@dataclass(frozen=True, eq=False)
class Join(Op):
    """Merge a forked state's branches back into one row each: ``concat`` appends them, ``collect``
    records them; other names: rules applications register (``decograph.runtime.branches``)."""
    NAME = "join"
    state: Value = operand()
    rule: str = "concat"


@dataclass(frozen=True, eq=False)
class Iterate(Op):
    """Run ``body`` until one of ``until`` holds for every row; ``max_steps`` 0 means no cap."""
    NAME = "iterate"
    init: Value = operand()
    body: Block = field(default=None)  # type: ignore[assignment]
    until: tuple[str, ...] = ("eos", "max_new_tokens")
    max_steps: int = 0


@dataclass(frozen=True, eq=False)
class Yield(Op):
    """Terminator of an ``iterate`` body: the loop-carried value for the next iteration."""
    NAME = "yield"
    value: Value = operand()


@dataclass(frozen=True, eq=False)
class Emit(Op):
    """The program's output: the new tokens of every row."""
    NAME = "emit"
    state: Value = operand()


def _draft_size(t: Type) -> Dim:
    return dim_mul(*t.shape[1:]) if t.rank >= 2 else 0


def _candidates_type(candidates: int, k: int) -> Type:
    return Type("Tokens", (B, k)) if candidates == 1 else Type("Tokens", (B, candidates, k))


def _head_type(op: DraftHead) -> Type:
    """``Tokens[B, C, depth]``: at most C chains (the tree's leaves: ``nodes``, ``N`` when the
    runtime sizes it) of at most ``depth`` tokens; one chain when a level keeps one node."""
    chains: Dim = 1 if op.topk == 1 or op.nodes == 1 else (op.nodes or Sym("N"))
    return Type("Tokens", (B, chains, op.depth))


def draft_chains(t: Type) -> Dim:
    """How many candidate chains a draft of type ``t`` holds (``Tokens[B, C, K]``: C)."""
    return t.shape[1] if t.rank > 2 else 1


def _forward_type(op: Forward) -> tuple[Type, ...]:
    st = op.state.type
    per_branch = dim_add(1, *(_draft_size(d.type) for d in op.drafts))
    t = dim_mul(per_branch, st.shape[0]) if st.shape else per_branch
    return (Type("Logits", (B, t, V)),)


ACCEPTED = (Type("Tokens", (B, Sym("A"))),)
STATE = (Type("State"),)


@dataclass(frozen=True)
class OpDef:
    """Registry entry: the op's class and its result-type rule."""

    cls: type[Op]
    result: Callable[[Any], tuple[Type, ...]]


OPS: dict[str, OpDef] = {}


def _reg(cls: type[Op], result: Callable[[Any], tuple[Type, ...]]) -> None:
    OPS[cls.NAME] = OpDef(cls, result)


_reg(Prefill, lambda op: STATE)
_reg(DraftJacobi, lambda op: (Type("Tokens", (B, op.window)),))
_reg(DraftGaussSeidelJacobi, lambda op: (Type("Tokens", (B, op.block)),))
_reg(DraftNgram, lambda op: (_candidates_type(op.candidates, op.k),))
_reg(DraftNgramPool, lambda op: (Type("Tokens", (B, op.candidates, op.n - 1)),))
_reg(DraftAdaptiveNgram, lambda op: (_candidates_type(op.candidates, op.k),))
_reg(DraftMask, lambda op: (Type("Tokens", (B, op.k)),))
_reg(DraftNoise, lambda op: (Type("Tokens", (B, op.k or Sym("L"))),))
_reg(DraftModel, lambda op: (Type("Tokens", (B, op.k)),))
_reg(DraftHead, lambda op: (_head_type(op),))
_reg(DraftCorpus, lambda op: (Type("Tokens", (B, op.k)),))
_reg(DraftBranches, lambda op: (Type("Tokens", (B, len(op.prompts) or op.max_branches, Sym("L"))),))
_reg(Forward, _forward_type)
for _cls in (VerifyGreedy, VerifySampling, VerifyThreshold, UnmaskThreshold, UnmaskFactor, UnmaskTopkPerStep,
             UnmaskEntropyBound):
    _reg(_cls, lambda op: ACCEPTED)
_reg(Commit, lambda op: (op.state.type,))
_reg(Fork, lambda op: (Type("State", (op.branches.type.shape[1],)),))
_reg(Join, lambda op: STATE)
_reg(Iterate, lambda op: (op.init.type,))
_reg(Yield, lambda op: ())
_reg(Emit, lambda op: (Type("Tokens", (B, Sym("G"))),))

DRAFT_OPS = tuple(c for n, d in OPS.items() if n.startswith("draft.") for c in [d.cls])
VERIFY_OPS = (VerifyGreedy, VerifySampling, VerifyThreshold)
UNMASK_OPS = (UnmaskThreshold, UnmaskFactor, UnmaskTopkPerStep, UnmaskEntropyBound)
MASK_RULES = (UnmaskThreshold, UnmaskFactor, UnmaskTopkPerStep)     # over draft.mask (masked diffusion)
NOISE_RULES = (UnmaskEntropyBound,)                                 # over draft.noise (uniform-noise diffusion)


def op_class(name: str) -> type[Op]:
    """The op class registered under text name ``name`` (KeyError lists the known ones)."""
    try:
        return OPS[name].cls
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(OPS))}") from None


@dataclass(frozen=True, eq=False)
class Program:
    """A decoding strategy: a name, documentation parameters, and a top-level block.

    The block's single parameter is the prompt (``Tokens[B, P]``); its last op is ``emit``.
    """

    name: str
    body: Block
    params: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def walk(self) -> Iterator[Op]:
        """Every op, pre-order, nested bodies included."""
        yield from _walk(self.body)

    @property
    def prompt(self) -> Value:
        return self.body.params[0]


def _walk(block: Block) -> Iterator[Op]:
    for op in block.ops:
        yield op
        if isinstance(op, Iterate) and op.body is not None:
            yield from _walk(op.body)


def make(cls: type[Op], *operands: Value, **attrs: Any) -> Op:
    """Build an op from positional operands and attributes, inferring its result types."""
    names = cls.operand_fields()
    kwargs: dict[str, Any] = {}
    rest = list(operands)
    for f in dataclasses.fields(cls):
        if f.name not in names:
            continue
        if f.metadata.get("variadic"):
            kwargs[f.name], rest = tuple(rest), []
        elif rest:
            kwargs[f.name] = rest.pop(0)
    if rest:
        raise TypeError(f"{cls.NAME} takes {len(names)} operands, got {len(operands)}")
    probe = cls(results=(), **kwargs, **attrs)
    types = OPS[cls.NAME].result(probe)
    return dataclasses.replace(probe, results=tuple(Value(t) for t in types))
