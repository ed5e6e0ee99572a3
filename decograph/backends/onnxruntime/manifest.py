"""The exported decoder's manifest (version 4): one writer, and a loader that treats the
directory as untrusted input. It imports neither torch nor transformers.

    {"format": "decograph-exported-decoder", "version": 4, "strategy": "anpd", "passes": "default",
     "program": "strategy.json", "tokenizer": "tokenizer.json",
     "graphs": {"target": {"file": "model.onnx", "quant": "int4", "dtype": "float32", "graph": "5",
                           "block_size": 32, "num_layers": 30, "kv_heads": 3, "head_dim": 64,
                           "vocab_size": 49152, "max_positions": 8192}},
     # a masked-diffusion decoder's target: "graph": "mdm-1", "mask_token_id": 63, "shift_logits": false
     "eos_token_ids": [2], "chat_template": null, "chat_prompt": "...{prompt}...", "chat_default": true,
     "model": "SmolLM2-135M-Instruct", "files": {"model.onnx": "<sha256>", ...}}

A ``draft.head`` program's decoder has a graph per head (role ``head:<i>``, ``"graph":
"head-2"``, ``"head"``: the name the program's ``draft.head(head=...)`` uses; its shape fields
are the head's: one layer, its K/V heads and head size, its vocabulary subset's size), and its
target's graph returns the hidden states the heads read (``"graph": "fused-8+hidden"``).

``load_manifest`` checks, before it allocates anything sized by the manifest: the file's size
and JSON syntax (no duplicate keys, no NaN), every field's type (a bool is not an integer)
and range, that every file it names is listed in ``files``, that every listed name is a plain
relative path inside the directory (no ``..``, no absolute path, no symbolic link on the way)
naming a regular file, the sha256 of each, and that the program (the IR's JSON form) parses
and verifies and the tokenizer loads. Every failure is a ``ManifestError`` naming the file and
the field path, e.g. ``out/manifest.json: field 'graphs.target.num_layers' is '3' (a string),
expected an integer in 1..512``. A graph entry may list ``external_data`` (ONNX external-data
file names); they must be listed in ``files`` too. The ONNX graphs themselves are not opened.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from decograph.backends.onnxruntime.graph import HIDDEN_TAG
from decograph.backends.onnxruntime.untrusted import ManifestError, file_digest, open_inside, parse_json, read_inside

__all__ = ["ManifestError", "Manifest", "GraphSpec", "MANIFEST_VERSION", "FORMAT", "MANIFEST_NAME",
           "load_manifest", "write_manifest", "check_fields"]

MANIFEST_VERSION = 4                 # 4: graphs by role, the IR program is what runs
FORMAT = "decograph-exported-decoder"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 1 << 20
MAX_PROGRAM_BYTES = 4 << 20
MAX_TOKENIZER_BYTES = 64 << 20
MAX_FILES = 64
MAX_GRAPHS = 16
DIFFUSION_GRAPHS = ("mdm-", "bd-")   # masked-diffusion forwards: mdm.build_mdm, block_diffusion.build_block_diffusion
MAX_EOS = 64
QUANTS = ("none", "int4", "int8")
DTYPES = ("float32", "float16")
BLOCK_SIZES = (16, 32, 64, 128, 256)
_SHAPE_FIELDS = {"num_layers": (1, 512), "kv_heads": (1, 1024), "head_dim": (1, 1024),
                 "vocab_size": (1, 4_194_304), "max_positions": (1, 4_194_304)}
_GRAPH_KEYS = {"file", "quant", "dtype", "graph", "block_size", *_SHAPE_FIELDS, "external_data", "mask_token_id",
               "shift_logits", "head"}
_OPTIONAL_GRAPH_KEYS = {"external_data", "mask_token_id", "shift_logits", "head"}
_TOP_KEYS = {"format", "version", "strategy", "passes", "program", "tokenizer", "graphs", "eos_token_ids",
             "chat_template", "chat_prompt", "chat_default", "model", "files", "corpora"}
MAX_CORPORA = 8
_GRAPH_NAME = re.compile(r"^(target|(draft|head):[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the decoder (``target``, ``draft:<name>`` or ``head:<i>``), its fields checked."""
    role: str
    file: str
    quant: str
    dtype: str
    graph: str
    block_size: int | None
    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    external_data: tuple[str, ...] = ()
    mask_token_id: int | None = None        # a masked-diffusion graph's (graph "mdm-*")
    shift_logits: bool = False              # ... whose logits at i predict the token at i + 1
    head: str | None = None                 # a draft head's graph (graph "head-*"): its draft.head(head=...) name

    @property
    def diffusion(self) -> bool:
        """Whether this is a masked-diffusion forward (``mdm.build_mdm``), not a causal step."""
        return self.graph.startswith(DIFFUSION_GRAPHS)


@dataclass(frozen=True)
class Manifest:
    """A checked decoder directory: the fields, the loaded IR ``program`` (what the decoder runs)
    and ``tokenizer`` (a ``tokenizers.Tokenizer``; None from ``check_fields``)."""
    directory: Path
    strategy: str
    passes: str
    program_file: str
    tokenizer_file: str
    graphs: Mapping[str, GraphSpec]
    eos_token_ids: tuple[int, ...]
    chat_template: str | None
    chat_prompt: str | None
    chat_default: bool
    model: str
    files: Mapping[str, str]
    program: Any = field(default=None, compare=False)
    tokenizer: Any = field(default=None, compare=False)
    corpora: Mapping[str, str] = field(default_factory=dict)    # draft.corpus(corpus=NAME) -> its file

    @property
    def target(self) -> GraphSpec:
        return self.graphs["target"]

    @property
    def heads(self) -> dict[str, GraphSpec]:
        """The draft heads' graphs by the name the program's ``draft.head`` ops use."""
        return {g.head: g for g in self.graphs.values() if g.head is not None}

    def path(self, name: str) -> Path:
        """The path of ``name``, a file listed in ``files`` (checked by ``load_manifest``)."""
        if name not in self.files:
            raise ManifestError(f"{self.directory / MANIFEST_NAME}: {name!r} is not a file listed in 'files'")
        return self.directory / name


# -- field checks ------------------------------------------------------------------------------

def _what(v: Any) -> str:
    """``'3' (a string)``: the value, shortened, and its JSON kind."""
    kind = {bool: "a bool", str: "a string", int: "an integer", float: "a number", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)
    text = repr(v) if v is not None else "null"
    return f"{text[:60] + '...' if len(text) > 60 else text} ({kind})"


class _Fields:
    """Typed reads of one JSON object; each failure names ``where`` and the field path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, msg: str) -> ManifestError:
        return ManifestError(f"{self.where}: field '{path}' {msg}")

    def bad(self, path: str, v: Any, expected: str) -> ManifestError:
        return self.fail(path, f"is {_what(v)}, expected {expected}")

    def obj(self, d: Any, path: str, required: set[str], allowed: set[str]) -> dict[str, Any]:
        if not isinstance(d, dict):
            raise ManifestError(f"{self.where}: {'the top level' if not path else f'field {path!r}'} is "
                                f"{_what(d)}, expected an object")
        pre = f"{path}." if path else ""
        for k in sorted(set(d) - allowed):
            raise self.fail(pre + k, f"is not a field of a version-{MANIFEST_VERSION} manifest (a newer export?)")
        for k in sorted(required - set(d)):
            raise self.fail(pre + k, "is missing")
        return d

    def int_(self, v: Any, path: str, lo: int, hi: int) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise self.bad(path, v, f"an integer in {lo}..{hi}")
        return v

    def str_(self, v: Any, path: str, lo: int, hi: int, null: bool = False) -> str | None:
        if v is None and null:
            return None
        if not isinstance(v, str) or not lo <= len(v) <= hi:
            raise self.bad(path, v, f"a string of {lo}..{hi} characters" + (" or null" if null else ""))
        return v

    def choice(self, v: Any, path: str, choices: tuple[Any, ...]) -> Any:
        if type(v) not in {type(c) for c in choices} or v not in choices:
            raise self.bad(path, v, "one of " + ", ".join("null" if c is None else repr(c) for c in choices))
        return v

    def bool_(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.bad(path, v, "true or false")
        return v

    def list_(self, v: Any, path: str, hi: int) -> list[Any]:
        if not isinstance(v, list) or len(v) > hi:
            raise self.bad(path, v, f"a list of at most {hi} items")
        return v


def _file_name(f: _Fields, v: Any, path: str) -> str:
    """A plain relative path inside the directory: no absolute path, ``..``, ``.``, empty part,
    backslash, NUL or control character."""
    name = f.str_(v, path, 1, 1024)
    assert name is not None
    parts = name.split("/")
    if (name.startswith("/") or any(p in ("", ".", "..") or len(p) > 255 for p in parts)
            or any(c in name for c in "\\\0:") or any(ord(c) < 32 for c in name) or name == MANIFEST_NAME):
        raise f.bad(path, v, "a plain relative file name inside the directory (no '..', no absolute path)")
    return name


def _graph(f: _Fields, d: Any, role: str) -> GraphSpec:
    path = f"graphs.{role}"
    f.obj(d, path, _GRAPH_KEYS - _OPTIONAL_GRAPH_KEYS, _GRAPH_KEYS)
    shape = {k: f.int_(d[k], f"{path}.{k}", lo, hi) for k, (lo, hi) in _SHAPE_FIELDS.items()}
    kind = str(f.str_(d["graph"], f"{path}.graph", 1, 100))
    mask = None
    if kind.startswith(DIFFUSION_GRAPHS):    # a masked-diffusion graph: its mask token is required
        if "mask_token_id" not in d:
            raise f.fail(f"{path}.mask_token_id", "is missing (a masked-diffusion graph needs its mask token)")
        mask = f.int_(d["mask_token_id"], f"{path}.mask_token_id", 0, shape["vocab_size"] - 1)
    elif "mask_token_id" in d or "shift_logits" in d:
        raise f.fail(f"{path}.mask_token_id" if "mask_token_id" in d else f"{path}.shift_logits",
                     f"belongs to a masked-diffusion graph only (graph 'mdm-*' or 'bd-*'), this one is {kind!r}")
    shift = f.bool_(d.get("shift_logits", False), f"{path}.shift_logits")
    head = None
    if role.startswith("head:") or "head" in d:
        if not role.startswith("head:") or not kind.startswith("head-"):
            raise f.fail(f"{path}.head" if "head" in d else f"{path}.graph",
                         f"a draft head's graph has role 'head:<i>', graph 'head-*' and field 'head' (this one: "
                         f"role {role!r}, graph {kind!r})")
        if "head" not in d:
            raise f.fail(f"{path}.head", "is missing (the draft.head name this graph serves)")
        head = f.str_(d["head"], f"{path}.head", 1, 1000)
    quant = f.choice(d["quant"], f"{path}.quant", QUANTS)
    block = f.choice(d["block_size"], f"{path}.block_size", (None, *BLOCK_SIZES))
    if (block is None) != (quant == "none"):
        raise f.bad(f"{path}.block_size", block, "an integer block size with int4/int8, null with quant 'none'")
    extra = f.list_(d.get("external_data", []), f"{path}.external_data", 16)
    return GraphSpec(role, _file_name(f, d["file"], f"{path}.file"), quant,
                     f.choice(d["dtype"], f"{path}.dtype", DTYPES),
                     kind, block, **shape,
                     external_data=tuple(_file_name(f, x, f"{path}.external_data[{i}]") for i, x in enumerate(extra)),
                     mask_token_id=mask, shift_logits=shift, head=head)


def _files(f: _Fields, d: Any) -> dict[str, str]:
    if not isinstance(d, dict) or len(d) > MAX_FILES:
        raise f.bad("files", d, f"an object of at most {MAX_FILES} file names and their sha256")
    out = {}
    for name, digest in d.items():
        key = f"files[{json.dumps(name, ensure_ascii=False)}]"
        _file_name(f, name, key)
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise f.bad(key, digest, "a sha256 digest (64 lowercase hex digits)")
        out[name] = digest
    return out


def check_fields(d: Any, where: str, directory: Path = Path(".")) -> Manifest:
    """The fields of manifest object ``d`` checked (types, ranges, names listed in ``files``), as a
    ``Manifest`` without program or tokenizer; ``where`` names the file in errors. Opens no file."""
    f = _Fields(where)
    f.obj(d, "", _TOP_KEYS - {"chat_template", "corpora"}, _TOP_KEYS)
    if d["format"] != FORMAT:
        raise f.bad("format", d["format"], repr(FORMAT) + " (not a decograph exported decoder)")
    version = d["version"]
    if type(version) is int and 1 <= version < MANIFEST_VERSION:
        raise ManifestError(f"{where}: exported by an older decograph (version {version}); export it again")
    if type(version) is not int or version != MANIFEST_VERSION:
        raise f.bad("version", version, f"{MANIFEST_VERSION} (a newer decograph's export? update decograph)")
    graphs_in = d["graphs"]
    if not isinstance(graphs_in, dict) or "target" not in graphs_in or len(graphs_in) > MAX_GRAPHS:
        raise f.bad("graphs", graphs_in, f"an object with 'target' and at most {MAX_GRAPHS - 1} 'draft:<name>' or "
                                         f"'head:<i>' graphs")
    for role in graphs_in:
        if not _GRAPH_NAME.match(role):
            raise f.fail(f"graphs.{role}", "is not a graph role; expected 'target', 'draft:<name>' or 'head:<i>'")
    graphs = {role: _graph(f, g, role) for role, g in graphs_in.items()}
    names = [g.head for g in graphs.values() if g.head is not None]
    if len(set(names)) != len(names):
        raise f.fail("graphs", f"has two graphs for one draft head ({sorted(names)})")
    if names and not graphs["target"].graph.endswith(HIDDEN_TAG):
        raise f.fail("graphs.target.graph", f"is {graphs['target'].graph!r}: a decoder with draft heads needs a "
                                            f"target graph with hidden states ('...{HIDDEN_TAG}')")
    vocab = graphs["target"].vocab_size
    eos = f.list_(d["eos_token_ids"], "eos_token_ids", MAX_EOS)
    eos_ids = tuple(f.int_(x, f"eos_token_ids[{i}]", 0, vocab - 1) for i, x in enumerate(eos))
    chat_prompt = f.str_(d["chat_prompt"], "chat_prompt", 8, 100_000, null=True)
    if chat_prompt is not None and "{prompt}" not in chat_prompt:
        raise f.bad("chat_prompt", chat_prompt, "a string holding '{prompt}' (where the prompt goes), or null")
    chat_default = f.bool_(d["chat_default"], "chat_default")
    if chat_default and chat_prompt is None:
        raise f.fail("chat_default", "is true but 'chat_prompt' is null")
    m = Manifest(directory, str(f.str_(d["strategy"], "strategy", 1, 200)), str(f.str_(d["passes"], "passes", 0, 1000)),
                 _file_name(f, d["program"], "program"), _file_name(f, d["tokenizer"], "tokenizer"),
                 MappingProxyType(graphs), eos_ids,
                 f.str_(d.get("chat_template"), "chat_template", 0, 1 << 20, null=True),
                 chat_prompt, chat_default, str(f.str_(d["model"], "model", 1, 1000)),
                 MappingProxyType(_files(f, d["files"])))
    corpora = d.get("corpora", {})
    if not isinstance(corpora, dict) or len(corpora) > MAX_CORPORA:
        raise f.bad("corpora", corpora, f"an object of at most {MAX_CORPORA} corpus names and their files")
    for name in corpora:
        f.str_(name, "corpora", 1, 1000)
    m = dataclasses.replace(m, corpora=MappingProxyType({str(k): _file_name(f, v, f"corpora[{json.dumps(k)}]")
                                                         for k, v in corpora.items()}))
    used = [("program", m.program_file), ("tokenizer", m.tokenizer_file)]
    used += [(f"corpora[{json.dumps(k)}]", v) for k, v in m.corpora.items()]
    used += [(f"graphs.{g.role}.file", g.file) for g in graphs.values()]
    used += [(f"graphs.{g.role}.external_data", x) for g in graphs.values() for x in g.external_data]
    for path, name in used:
        if name not in m.files:
            raise f.fail(path, f"names {name!r}, which is not listed in 'files' (its sha256 is unknown)")
    return m


def _load_program(data: bytes, path: Path, strategy: str, heads: Mapping[str, GraphSpec],
                  corpora: Mapping[str, str] = MappingProxyType({})) -> Any:
    from decograph.errors import DecographError
    from decograph.ir.jsonform import from_json
    from decograph.ir.verify import verify

    try:
        program = verify(from_json(parse_json(data, str(path))))
    except ManifestError:
        raise
    except (DecographError, KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError) as exc:
        detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, DecographError) else str(exc)
        raise ManifestError(f"{path}: not a valid strategy program ({detail})") from None
    if program.name != strategy:
        raise ManifestError(f"{path}: program of strategy {program.name!r}, the manifest says {strategy!r}")
    for op in program.walk():
        if op.NAME == "draft.head" and op.head not in heads:
            raise ManifestError(f"{path}: step `draft.head(head={op.head})` has no head graph in the manifest "
                                f"(graphs 'head:<i>' with \"head\": {op.head!r})")
        if op.NAME == "draft.corpus" and op.corpus not in corpora:
            raise ManifestError(f"{path}: step `draft.corpus(corpus={op.corpus})` has no corpus file in the manifest "
                                f"('corpora')")
    return program


def _load_tokenizer(data: bytes, path: Path, vocab: int) -> Any:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
        size = tok.get_vocab_size()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:            # tokenizers raises Exception, and pyo3 panics are BaseException
        raise ManifestError(f"{path}: not a valid tokenizer ({type(exc).__name__}: {str(exc)[:300]})") from None
    if size > vocab:
        raise ManifestError(f"{path}: the tokenizer has {size} tokens, more than the target graph's vocab_size "
                            f"{vocab}")
    return tok


def load_manifest(directory: str | Path, *, check_hashes: bool = True) -> Manifest:
    """The checked manifest of the decoder ``directory``, with its program (verified IR) and
    tokenizer loaded; raises ``ManifestError`` naming the file and field on anything wrong
    (see the module docstring). ``check_hashes=False`` skips the sha256 of the graph files
    only: the program and tokenizer are small and always checked."""
    d = Path(directory)
    mpath = d / MANIFEST_NAME
    if not d.is_dir():
        raise ManifestError(f"{d}: not a directory (an exported decoder is one)")
    try:
        st = os.lstat(mpath)
    except OSError:
        raise ManifestError(f"{d}: no {MANIFEST_NAME} (not a decograph exported decoder)") from None
    if not stat.S_ISREG(st.st_mode):
        raise ManifestError(f"{mpath}: not a regular file (a symbolic link?); a decoder directory holds plain "
                            f"files only")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{mpath}: {st.st_size} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have")
    data = read_inside(d, MANIFEST_NAME, str(mpath), MAX_MANIFEST_BYTES, None) or b""
    m = check_fields(parse_json(data, str(mpath)), str(mpath), d)
    small = {m.program_file: MAX_PROGRAM_BYTES, m.tokenizer_file: MAX_TOKENIZER_BYTES}
    for name in m.files:            # every listed file: inside, regular, no link
        os.close(open_inside(d, name, str(mpath)))
    if check_hashes:
        for name, digest in m.files.items():
            if name not in small:
                read_inside(d, name, str(mpath), None, digest)
    program = _load_program(read_inside(d, m.program_file, str(mpath), small[m.program_file],
                                  m.files[m.program_file]) or b"", d / m.program_file, m.strategy, m.heads,
                            m.corpora)
    tokenizer = _load_tokenizer(read_inside(d, m.tokenizer_file, str(mpath), small[m.tokenizer_file],
                                      m.files[m.tokenizer_file]) or b"", d / m.tokenizer_file, m.target.vocab_size)
    return dataclasses.replace(m, program=program, tokenizer=tokenizer)


def write_manifest(directory: str | Path, fields: dict[str, Any]) -> Path:
    """Write ``directory/manifest.json`` from ``fields`` (every field but ``format``, ``version``
    and ``files``, which are filled in): ``files`` gets the sha256 of every file the fields
    name (program, tokenizer, each graph's file and external data). The fields are checked as
    ``load_manifest`` would (``ManifestError``), so an export never writes what a load refuses."""
    d = Path(directory)
    body = {"format": FORMAT, "version": MANIFEST_VERSION, **{k: v for k, v in fields.items() if k != "files"}}
    names = [body.get("program"), body.get("tokenizer")]
    for g in (body.get("graphs") or {}).values():
        if isinstance(g, dict):
            extra = g.get("external_data", [])
            names += [g.get("file"), *(extra if isinstance(extra, list) else [])]
    names += list((body.get("corpora") or {}).values())
    listed = sorted({n for n in names if isinstance(n, str)})
    check_fields(dict(body, files={n: "0" * 64 for n in listed}), str(d / MANIFEST_NAME), d)   # names first
    body["files"] = {n: file_digest(d / n) for n in listed}
    out = d / MANIFEST_NAME
    out.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
