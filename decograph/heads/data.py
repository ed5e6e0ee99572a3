"""Training data of a draft head: text that ships with Python, the target's own answers, and the
target's features over both, prepared once per model and cached.

Sources (``SOURCES``; nothing else is read, the benchmark prompts never):

- ``text``: the running Python's standard library (``.py`` files, test packages excluded:
  code, comments, docstrings) and the language reference that ships with it
  (``pydoc_data.topics``). One window of ``seq_len`` tokens per document, documents in a fixed
  shuffled order.
- ``chat``: requests derived from those documents ("Explain what ``json.dumps`` does", "Write a
  Python function that ...", summarize / translate / answer from a docstring, explain a short
  function's source), wrapped in the tokenizer's chat template where it has one, answered by
  the target with decograph's own batched greedy decoding (lossless: the target's greedy
  text). The answer is what a head drafts at inference; the prompt positions still train.

Documents whose name hashes to 0 mod 20 are held out (their windows and their requests).

Features: for every chunk, the target's final hidden state (after the final norm: the LM
head's input) at every position, float16, and its argmax (``argmax[i]`` = the target's greedy
prediction of token ``i+1``), from the Hugging Face model in inference mode. ``FeatureStore``
keeps them as shard files and a manifest under the head's cache directory; each stream
(``text/train``, ``text/heldout``, ``chat/train``, ``chat/heldout``) is the prefix of a
deterministic sequence, so a resumed or longer preparation only appends.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import itertools
import json
import os
import random
import sysconfig
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from decograph.errors import InputError, ModelError

__all__ = ["SOURCES", "Chunks", "DataPlan", "Doc", "FeatureStore", "chat_prompts", "corpus_counts", "documents", "features", "held_out",
           "prepare", "text_windows", "vocab_ranking"]

FORMAT = 1
STREAMS = ("text/train", "text/heldout", "chat/train", "chat/heldout")
_SKIP = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3"}
_LANGS = ("French", "German", "Spanish", "Italian", "Portuguese", "Chinese")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def SOURCES() -> list[Path]:
    """What the data reads: the standard library directory (``pydoc_data`` is inside it)."""
    return [_stdlib()]


@dataclass(frozen=True)
class Doc:
    name: str           # "json/encoder.py" or "reference:assert"
    text: str
    kind: str           # "code" or "docs"


def held_out(name: str) -> bool:
    """Whether a document (its windows and the requests derived from it) is held out."""
    return zlib.crc32(name.encode()) % 20 == 0


def documents(root: Path | None = None) -> list[Doc]:
    """The standard library's ``.py`` files (tests and ``site-packages`` excluded) and
    ``pydoc_data``'s language reference topics, sorted by name (read once per process).
    ``InputError`` when there are none."""
    return list(_documents(str(root or _stdlib())))


@functools.lru_cache(maxsize=2)
def _documents(root: str) -> tuple[Doc, ...]:
    base, out = Path(root), []
    for where, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP and not d.startswith("."))
        rel_dir = Path(where).relative_to(base)
        if rel_dir.parts[:1] == ("pydoc_data",):
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                out.append(Doc((rel_dir / name).as_posix(), (Path(where) / name).read_text(encoding="utf-8"), "code"))
            except (UnicodeDecodeError, OSError):
                continue
    topics = base / "pydoc_data" / "topics.py"
    if topics.is_file():
        try:
            table = ast.literal_eval(ast.parse(topics.read_text(encoding="utf-8")).body[-1].value)  # type: ignore[attr-defined]
        except (ValueError, SyntaxError, AttributeError, IndexError):
            table = {}
        out += [Doc(f"reference:{k}", v, "docs") for k, v in sorted(table.items()) if isinstance(v, str)]
    if not out:
        raise InputError(f"no standard library sources under {base} to train a draft head on")
    return tuple(sorted(out, key=lambda d: d.name))


def _shuffled(items: list[Any], salt: str) -> list[Any]:
    items = list(items)
    random.Random(salt).shuffle(items)
    return items


def _clip(text: str, limit: int) -> str:
    """``text`` cut at a paragraph (else line) boundary before ``limit`` characters."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    at = cut.rfind("\n\n")
    at = at if at > limit // 3 else cut.rfind("\n")
    return cut[:at if at > limit // 3 else limit].rstrip()


def _requests(doc: Doc) -> Iterator[str]:
    """Chat requests derived from one document (deterministic)."""
    if doc.kind == "docs":
        topic = doc.name.split(":", 1)[1]
        body = _clip(doc.text, 1000)
        pick = zlib.crc32(doc.name.encode()) % 3
        yield (f"Explain this part of the Python language reference in simple words:\n\n{body}",
               f"Summarize the following text about Python's `{topic}` in a few sentences:\n\n{body}",
               f"Write a short Python example that illustrates this, and explain it:\n\n{_clip(body, 400)}")[pick]
        return
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return
    mod = doc.name.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    lines = doc.text.splitlines()
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        docstring = ast.get_docstring(node) or ""
        if len(docstring) < 40:
            continue
        qual = f"{mod}.{node.name}"
        first = docstring.strip().split("\n\n")[0].replace("\n", " ").strip()
        src = "\n".join(lines[node.lineno - 1:node.end_lineno or node.lineno])
        options = [f"Explain what `{qual}` does in Python.",
                   f"Summarize this documentation in two or three sentences:\n\n{_clip(docstring, 900)}",
                   f"Translate into {_LANGS[zlib.crc32(qual.encode()) % len(_LANGS)]}:\n\n{_clip(first, 400)}",
                   f"Read the documentation below and answer: what does `{node.name}` do, and when would I use "
                   f"it?\n\n{_clip(docstring, 900)}",
                   f"Give a short example of using `{qual}`, with a sentence explaining it."]
        if isinstance(node, ast.FunctionDef):
            options.append(f"Write a Python function that does the following: {_clip(first, 300)}")
            if src.count("\n") < 30:
                options.append(f"What does this Python code do?\n\n```python\n{src}\n```")
        yield options[zlib.crc32(qual.encode()) % len(options)]


def chat_prompts(docs: list[Doc], split: str, start: int = 0, per_doc: int = 2) -> Iterator[tuple[int, str]]:
    """(cursor after it, request) of the ``split`` ("train"/"heldout") documents from request
    ``start`` on: documents in a fixed shuffled order, at most ``per_doc`` requests each
    (parsed lazily: a short run reads few files)."""
    keep = _shuffled([d for d in docs if held_out(d.name) == (split == "heldout")], f"chat/{split}")
    i = 0
    for d in keep:
        for r in _shuffled(list(_requests(d)), d.name)[:per_doc]:
            i += 1
            if i > start:
                yield i, r


def text_windows(docs: list[Doc], split: str, tokenizer: Any, seq_len: int, start: int = 0) -> Iterator[tuple[int, list[int]]]:
    """(cursor after it, token window) of the ``split`` documents from document ``start`` on:
    one window of at most ``seq_len`` tokens per document of 64 tokens or more."""
    keep = _shuffled([d for d in docs if held_out(d.name) == (split == "heldout")], f"text/{split}")
    for i in range(start, len(keep)):
        ids = list(tokenizer(keep[i].text, add_special_tokens=False)["input_ids"])
        if len(ids) < 64:
            continue
        at = zlib.crc32(keep[i].name.encode()) % max(1, len(ids) - seq_len + 1)
        yield i + 1, ids[at:at + seq_len]


@dataclass
class Chunks:
    """Prepared chunks, right-padded to ``seq_len``: ``tokens`` [n, L] int32, ``lengths`` [n],
    ``starts`` [n] (the first row a draft may root at: the last prompt token of a chat chunk, 0
    for text), ``feats`` [n, L, H] float16, ``argmax`` [n, L] int32 (-1 past ``lengths``)."""

    tokens: np.ndarray
    lengths: np.ndarray
    starts: np.ndarray
    feats: np.ndarray
    argmax: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)

    @staticmethod
    def concat(parts: list["Chunks"], seq_len: int, hidden: int) -> "Chunks":
        if not parts:
            return Chunks(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32),
                          np.zeros((0, seq_len, hidden), np.float16), np.zeros((0, seq_len), np.int32))
        return Chunks(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("tokens", "lengths", "starts", "feats", "argmax")))

    def pick(self, index: np.ndarray) -> "Chunks":
        """The chunks at ``index`` (copies)."""
        return Chunks(self.tokens[index], self.lengths[index], self.starts[index], self.feats[index],
                      self.argmax[index])

    def rows(self, a: int, b: int) -> "Chunks":
        """Chunks ``a`` to ``b`` (a view)."""
        return Chunks(self.tokens[a:b], self.lengths[a:b], self.starts[a:b], self.feats[a:b], self.argmax[a:b])


@torch.inference_mode()
def features(model: Any, seqs: list[list[int]], starts: list[int], seq_len: int, batch: int = 4) -> Chunks:
    """The target's final hidden states and argmax over each sequence (at most ``seq_len``
    tokens), a few sequences per forward. Right padding changes no real position (attention
    is causal)."""
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    H = int(lm_head.weight.shape[1])
    n = len(seqs)
    tokens = np.zeros((n, seq_len), np.int32)
    lengths = np.array([len(s) for s in seqs], np.int32)
    feats = np.zeros((n, seq_len, H), np.float16)
    argmax = np.full((n, seq_len), -1, np.int32)
    for i, s in enumerate(seqs):
        if not 0 < len(s) <= seq_len:
            raise ModelError(f"draft-head data: a sequence of {len(s)} tokens (1..{seq_len} expected)")
        tokens[i, :len(s)] = s
    for b in range(0, n, batch):
        width = int(lengths[b:b + batch].max())
        h = decoder(input_ids=torch.as_tensor(tokens[b:b + batch, :width], dtype=torch.long)).last_hidden_state
        for r in range(h.shape[0]):
            m = int(lengths[b + r])
            for c in range(0, m, 128):          # the LM head in slices: a [L, V] block of logits can be large
                argmax[b + r, c:min(m, c + 128)] = lm_head(h[r, c:min(m, c + 128)]).argmax(-1).numpy()
            feats[b + r, :m] = h[r, :m].to(torch.float16).numpy()
    return Chunks(tokens, lengths, np.asarray(starts, np.int32), feats, argmax)


def vocab_ranking(chunks: Chunks, prior: np.ndarray | None = None, prior_weight: float = 0.5) -> np.ndarray:
    """Every token id, the ones the target predicts most in ``chunks`` first. ``prior`` (token
    counts of a corpus, e.g. ``corpus_counts``), rescaled to ``prior_weight`` times the argmax
    count, is added to the counts: it ranks the tokens a small sample never saw, or saw once."""
    valid = chunks.argmax[chunks.argmax >= 0].astype(np.int64)
    n = len(prior) if prior is not None else int(valid.max(initial=0)) + 1
    score = np.bincount(valid, minlength=n).astype(np.float64)
    if prior is not None and prior.sum() > 0:
        score += prior_weight * prior * (score.sum() or 1.0) / prior.sum()
    return np.argsort(-score, kind="stable").astype(np.int64)


def corpus_counts(store: "FeatureStore", tokenizer: Any, vocab_size: int, chars: int) -> np.ndarray:
    """How often each token occurs in the training documents (the first ``chars`` characters of
    them in the text stream's order; tokenizing only, no forward; cached beside the features)."""
    path = store.root / f"corpus-counts-{chars}.npy"
    try:
        counts = np.load(path, allow_pickle=False)
        if counts.shape == (vocab_size,):
            return counts
    except (OSError, ValueError):
        pass
    counts = np.zeros(vocab_size, np.int64)
    for d in _shuffled([d for d in documents() if not held_out(d.name)], "text/train"):
        ids = np.asarray(tokenizer(d.text[:chars], add_special_tokens=False)["input_ids"], np.int64)
        counts += np.bincount(ids[ids < vocab_size], minlength=vocab_size)
        chars -= len(d.text)
        if chars <= 0:
            break
    store.root.mkdir(parents=True, exist_ok=True)
    tmp = store.root / f".corpus-counts.{os.getpid()}.npy"
    np.save(tmp, counts)
    os.replace(tmp, path)
    return counts


class FeatureStore:
    """Prepared chunks of one model in ``root``: shard files and ``manifest.json`` (per stream:
    its shards, chunk count and the cursor of its next source item). Writes are atomic."""

    def __init__(self, root: Path, key: dict[str, Any]) -> None:
        self.root, self.key = Path(root), dict(key, format=FORMAT)
        self.reload()

    def reload(self) -> None:
        try:
            manifest = json.loads((self.root / "manifest.json").read_text())
        except (OSError, ValueError):
            manifest = None
        if not isinstance(manifest, dict) or manifest.get("key") != self.key:
            manifest = {"key": self.key, "streams": {s: {"shards": [], "chunks": 0, "cursor": 0} for s in STREAMS}}
        self.manifest = manifest

    @contextlib.contextmanager
    def writer(self) -> Iterator[bool]:
        """Yields whether this process may extend the store: False while another holds it
        (two preparations appending at once would overwrite each other's shards)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as f:
            try:
                import fcntl

                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:
                pass                                # no advisory locks here: a single writer is assumed
            except OSError:
                yield False
                return
            self.reload()                           # what another process appended before us
            yield True

    def count(self, stream: str) -> int:
        return int(self.manifest["streams"][stream]["chunks"])

    def cursor(self, stream: str) -> int:
        return int(self.manifest["streams"][stream]["cursor"])

    def tokens(self, stream: str) -> int:
        return int(self.manifest["streams"][stream].get("tokens", 0))

    def add(self, stream: str, chunks: Chunks, cursor: int) -> None:
        """Append ``chunks`` to ``stream`` whose source is now consumed up to ``cursor``."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.manifest["streams"][stream]
        name = f"{stream.replace('/', '-')}-{len(entry['shards']):05d}.npz"
        tmp = self.root / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, tokens=chunks.tokens, lengths=chunks.lengths, starts=chunks.starts, feats=chunks.feats,
                     argmax=chunks.argmax)
        os.replace(tmp, self.root / name)
        entry["shards"].append([name, len(chunks)])
        entry["chunks"] += len(chunks)
        entry["tokens"] = entry.get("tokens", 0) + int(chunks.lengths.sum())
        self.advance(stream, cursor)

    def advance(self, stream: str, cursor: int) -> None:
        """Record that ``stream``'s source is consumed up to ``cursor``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest["streams"][stream]["cursor"] = cursor
        tmp = self.root / f".manifest.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(self.manifest, indent=1))
        os.replace(tmp, self.root / "manifest.json")

    def load(self, stream: str, n: int, seq_len: int, hidden: int) -> Chunks:
        """The first ``n`` chunks of ``stream``."""
        parts, have = [], 0
        for name, count in self.manifest["streams"][stream]["shards"]:
            if have >= n:
                break
            try:
                with np.load(self.root / name, allow_pickle=False) as z:
                    parts.append(Chunks(z["tokens"], z["lengths"], z["starts"], z["feats"], z["argmax"]))
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{self.root / name}: a broken draft-head data shard ({exc}); delete "
                                 f"{self.root} to prepare the data again") from None
            have += count
        return Chunks.concat(parts, seq_len, hidden).rows(0, n)


def generate_answers(adapter: Any, tokenizer: Any, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """Each prompt (token ids) followed by the target's greedy answer of at most ``max_new``
    tokens, decoded in one batched call of decograph's own decoding."""
    import decograph

    results = decograph.generate(adapter, tokenizer, prompts, strategy="greedy", max_new_tokens=max_new)
    return [r.prompt_ids + r.new_token_ids for r in results]


def _source(kind: str, split: str, docs: list[Doc], tokenizer: Any, plan: "DataPlan",
            start: int) -> Iterator[tuple[int, list[int]]]:
    """(cursor after it, token ids) of a stream from ``start``: text windows, or chat requests
    (in the chat template where the tokenizer has one) short enough for an answer."""
    if kind == "text":
        yield from text_windows(docs, split, tokenizer, plan.seq_len, start)
        return
    from decograph.api.inputs import encode_prompts

    chat = bool(getattr(tokenizer, "chat_template", None))
    requests = (chat_prompts(docs, split, start) if not plan.questions else
                ((i + 1, q) for i, q in enumerate(plan.questions)      # every 10th held out
                 if i >= start and (i % 10 == 0) == (split == "heldout")))
    for cur, request in requests:
        [ids] = encode_prompts([request], tokenizer, chat)
        if len(ids) + plan.max_new <= plan.seq_len:
            yield cur, ids


@dataclass(frozen=True)
class DataPlan:
    """How much to prepare: per stream a chunk count (None: until its deadline, a
    ``time.monotonic()`` value; a batch that would not end by then is not started)."""

    seq_len: int = 512
    chat_heldout: int = 8
    text_heldout: int = 4
    chat_train: int | None = None
    text_train: int | None = None
    chat_deadline: float | None = None
    text_deadline: float | None = None
    gen_batch: int = 16
    max_new: int = 192
    feature_batch: int = 4
    questions: tuple[str, ...] = ()       # requests from a questions file instead of the standard library's


def prepare(store: FeatureStore, adapter: Any, tokenizer: Any, plan: DataPlan,
            progress: Callable[[str, int], None] = lambda stream, tokens: None) -> None:
    """Extend ``store``'s streams as ``plan`` asks: held-out chat and text first (always to their
    counts), then the target's answers (bounded by ``chat_deadline``), then text windows."""
    docs = documents()
    order = (("chat/heldout", plan.chat_heldout, None), ("text/heldout", plan.text_heldout, None),
             ("chat/train", plan.chat_train, plan.chat_deadline), ("text/train", plan.text_train, plan.text_deadline))
    for stream, target, deadline in order:
        if target is None and deadline is None:
            continue
        kind, split = stream.split("/")
        items = _source(kind, split, docs, tokenizer, plan, store.cursor(stream))
        last = 0.0                                  # the last batch's seconds: is there time for another?
        while target is None or store.count(stream) < target:
            if deadline is not None and time.monotonic() + last > deadline:
                break
            t0 = time.monotonic()
            size = plan.gen_batch if kind == "chat" else plan.feature_batch
            batch = list(itertools.islice(items, size if target is None else min(size, target - store.count(stream))))
            if not batch:
                break                               # the source is exhausted
            seqs = [ids for _, ids in batch]
            starts = [len(ids) - 1 for ids in seqs] if kind == "chat" else [0] * len(seqs)
            if kind == "chat":
                seqs = generate_answers(adapter, tokenizer, seqs, plan.max_new)
            chunks = features(adapter.model, seqs, starts, plan.seq_len, plan.feature_batch)
            store.add(stream, chunks, batch[-1][0])
            progress(stream, int(chunks.lengths.sum()))
            last = time.monotonic() - t0
