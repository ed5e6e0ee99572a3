"""The exported decoder's manifest (``decograph.backends.onnxruntime.manifest``): a valid
directory loads; every kind of bad or hostile input is a ``ManifestError`` naming the file and
the field, raised before anything sized by the manifest is allocated."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from decograph.backends.onnxruntime.manifest import (FORMAT, MANIFEST_VERSION, ManifestError, load_manifest,
                                                     write_manifest)
from decograph.errors import DecographError, ModelError

GRAPH = {"file": "model.onnx", "quant": "int4", "dtype": "float32", "graph": "5", "block_size": 32,
         "num_layers": 30, "kv_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_positions": 8192}


@pytest.fixture(scope="module")
def valid_dir(tmp_path_factory) -> Path:
    """A complete version-4 directory: the anpd program, the default model's tokenizer and a
    dummy graph file (the loader never opens the graph)."""
    from decograph.frontends.strategies import load_strategy
    from decograph.ir.jsonform import to_json
    from decograph.models.default import default_model_path

    d = tmp_path_factory.mktemp("decoder")
    (d / "strategy.json").write_text(json.dumps(to_json(load_strategy("anpd").program)), encoding="utf-8")
    shutil.copyfile(default_model_path(progress=False) / "tokenizer.json", d / "tokenizer.json")
    (d / "model.onnx").write_bytes(b"not really onnx")
    write_manifest(d, {"strategy": "anpd", "passes": "default", "program": "strategy.json",
                       "tokenizer": "tokenizer.json", "graphs": {"target": GRAPH}, "eos_token_ids": [2],
                       "chat_template": None, "chat_prompt": "<|user|>{prompt}<|assistant|>", "chat_default": True,
                       "model": "SmolLM2-135M-Instruct"})
    return d


@pytest.fixture
def dec(valid_dir, tmp_path) -> Path:
    """A fresh copy of the valid directory, for one test to spoil."""
    return Path(shutil.copytree(valid_dir, tmp_path / "dec"))


def _edit(d: Path, fn) -> None:
    """Rewrite manifest.json through ``fn(manifest_dict)`` (no checks: the loader must do them)."""
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def _rehash(d: Path, name: str) -> None:
    _edit(d, lambda m: m["files"].__setitem__(name, hashlib.sha256((d / name).read_bytes()).hexdigest()))


def _fails(d: Path, *parts: str) -> str:
    with pytest.raises(ManifestError) as info:
        load_manifest(d)
    msg = str(info.value)
    for part in parts:
        assert part in msg, msg
    return msg


def test_a_valid_directory_loads(valid_dir) -> None:
    m = load_manifest(valid_dir)
    assert m.strategy == m.program.name == "anpd" and m.target.num_layers == 30 and m.target.quant == "int4"
    assert m.tokenizer.get_vocab_size() <= m.target.vocab_size
    assert m.eos_token_ids == (2,) and m.chat_default and m.path("model.onnx") == valid_dir / "model.onnx"
    assert sorted(m.files) == ["model.onnx", "strategy.json", "tokenizer.json"]
    raw = json.loads((valid_dir / "manifest.json").read_text())
    assert raw["format"] == FORMAT and raw["version"] == MANIFEST_VERSION == 4
    with pytest.raises(ManifestError, match="not a file listed"):
        m.path("../manifest.json")
    with pytest.raises(Exception):
        m.strategy = "x"                        # frozen


def test_manifest_error_is_a_model_error() -> None:
    assert issubclass(ManifestError, ModelError) and issubclass(ManifestError, DecographError)


def test_a_list_is_refused(dec) -> None:
    (dec / "manifest.json").write_text("[]")
    _fails(dec, "manifest.json: the top level is [] (a list), expected an object")


def test_a_missing_field(dec) -> None:
    _edit(dec, lambda m: m.pop("model"))
    _fails(dec, "manifest.json: field 'model' is missing")


def test_an_unknown_field(dec) -> None:
    _edit(dec, lambda m: m.__setitem__("plan", {}))
    _fails(dec, "field 'plan' is not a field of a version-4 manifest")


def test_a_string_for_a_number(dec) -> None:
    _edit(dec, lambda m: m["graphs"]["target"].__setitem__("num_layers", "3"))
    msg = _fails(dec)
    assert msg == (f"{dec}/manifest.json: field 'graphs.target.num_layers' is '3' (a string), "
                   f"expected an integer in 1..512")


def test_a_bool_for_an_int(dec) -> None:
    _edit(dec, lambda m: m["graphs"]["target"].__setitem__("kv_heads", True))
    _fails(dec, "field 'graphs.target.kv_heads' is True (a bool), expected an integer in 1..1024")


def test_a_float_for_an_int(dec) -> None:
    _edit(dec, lambda m: m["graphs"]["target"].__setitem__("head_dim", 64.0))
    _fails(dec, "field 'graphs.target.head_dim' is 64.0 (a number), expected an integer")


def test_huge_num_layers(dec) -> None:
    _edit(dec, lambda m: m["graphs"]["target"].__setitem__("num_layers", 1_000_000_000))
    _fails(dec, "field 'graphs.target.num_layers' is 1000000000 (an integer), expected an integer in 1..512")


def test_huge_vocab_size(dec) -> None:
    _edit(dec, lambda m: m["graphs"]["target"].__setitem__("vocab_size", 10 ** 30))
    _fails(dec, "field 'graphs.target.vocab_size'", "expected an integer in 1..4194304")


def test_an_eos_id_outside_the_vocabulary(dec) -> None:
    _edit(dec, lambda m: m.__setitem__("eos_token_ids", [2, 49152]))
    _fails(dec, "field 'eos_token_ids[1]' is 49152", "in 0..49151")
    _edit(dec, lambda m: m.__setitem__("eos_token_ids", list(range(65))))
    _fails(dec, "field 'eos_token_ids'", "at most 64 items")


def test_a_draft_graph_is_checked_too(dec) -> None:
    _edit(dec, lambda m: m["graphs"].__setitem__("draft:small", dict(GRAPH, quant="int2")))
    _fails(dec, "field 'graphs.draft:small.quant' is 'int2' (a string), expected one of 'none', 'int4', 'int8'")
    _edit(dec, lambda m: m["graphs"].__setitem__("evil", GRAPH))
    _fails(dec, "field 'graphs.evil' is not a graph role")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "a/../../x", "a\\b", "./model.onnx", "a//b"])
def test_a_file_name_outside_the_directory(dec, name) -> None:
    _edit(dec, lambda m: m["files"].__setitem__(name, "0" * 64))
    _fails(dec, f"field 'files[{json.dumps(name)}]'", "expected a plain relative file name inside the directory")


def test_a_symlink_out_of_the_directory(dec, tmp_path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"not really onnx")               # the same bytes: the hash would match
    (dec / "model.onnx").unlink()
    (dec / "model.onnx").symlink_to(outside)
    _fails(dec, "file 'model.onnx'", "is a symbolic link")


def test_a_symlinked_folder_out_of_the_directory(dec, tmp_path) -> None:
    (tmp_path / "out").mkdir()
    shutil.copyfile(dec / "model.onnx", tmp_path / "out" / "model.onnx")
    (dec / "sub").symlink_to(tmp_path / "out")
    _edit(dec, lambda m: (m["graphs"]["target"].__setitem__("file", "sub/model.onnx"),
                          m["files"].__setitem__("sub/model.onnx", m["files"]["model.onnx"])))
    _fails(dec, "file 'sub/model.onnx'", "sub is a symbolic link")


def test_a_listed_file_that_is_a_directory(dec) -> None:
    (dec / "model.onnx").unlink()
    (dec / "model.onnx").mkdir()
    _fails(dec, "file 'model.onnx'")


def test_a_missing_file(dec) -> None:
    (dec / "model.onnx").unlink()
    _fails(dec, "file 'model.onnx' is listed but", "cannot be read")


def test_the_model_file_not_listed(dec) -> None:
    _edit(dec, lambda m: m["files"].pop("model.onnx"))
    _fails(dec, "field 'graphs.target.file' names 'model.onnx', which is not listed in 'files'")


def test_a_hash_mismatch(dec) -> None:
    (dec / "model.onnx").write_bytes(b"tampered")
    _fails(dec, "model.onnx: its sha256 differs from the manifest's")
    load_manifest(dec, check_hashes=False)          # the graph's hash only is skipped


def test_a_bad_digest(dec) -> None:
    _edit(dec, lambda m: m["files"].__setitem__("model.onnx", "ABC"))
    _fails(dec, "field 'files[\"model.onnx\"]' is 'ABC' (a string), expected a sha256 digest")


def test_a_garbage_tokenizer(dec) -> None:
    (dec / "tokenizer.json").write_text('{"model": {"type": "nonsense"}}')
    _rehash(dec, "tokenizer.json")
    _fails(dec, "tokenizer.json: not a valid tokenizer")


def test_a_tokenizer_larger_than_the_graph(dec) -> None:
    _edit(dec, lambda m: (m["graphs"]["target"].__setitem__("vocab_size", 1000), m.__setitem__("eos_token_ids", [2])))
    _fails(dec, "tokenizer.json: the tokenizer has 49152 tokens, more than the target graph's vocab_size 1000")


def test_a_garbage_program(dec) -> None:
    (dec / "strategy.json").write_text('{"ops": 7}')
    _rehash(dec, "strategy.json")
    _fails(dec, "strategy.json: not a valid strategy program")
    (dec / "strategy.json").write_text("[[[[")
    _rehash(dec, "strategy.json")
    _fails(dec, "strategy.json: not valid JSON")


def test_a_program_the_verifier_refuses(dec) -> None:
    program = json.loads((dec / "strategy.json").read_text())
    [draft] = [op for op in program["ops"][1]["body"]["ops"] if op["op"] == "draft.adaptive_ngram"]
    draft["attrs"]["k"] = 1_000_000_000
    (dec / "strategy.json").write_text(json.dumps(program))
    _rehash(dec, "strategy.json")
    _fails(dec, "strategy.json: not a valid strategy program", "verify error", "field 'k'")


def test_a_program_of_another_strategy(dec) -> None:
    program = json.loads((dec / "strategy.json").read_text())
    program["strategy"] = "greedy"
    (dec / "strategy.json").write_text(json.dumps(program))
    _rehash(dec, "strategy.json")
    _fails(dec, "program of strategy 'greedy', the manifest says 'anpd'")


def test_an_oversize_manifest(dec) -> None:
    _edit(dec, lambda m: m.__setitem__("chat_template", "x" * (1 << 20)))
    _fails(dec, "manifest.json: ", "bytes, more than the 1048576 a manifest may have")


def test_an_older_version(dec) -> None:
    _edit(dec, lambda m: m.__setitem__("version", 3))
    _fails(dec, "manifest.json: exported by an older decograph (version 3); export it again")
    _edit(dec, lambda m: m.__setitem__("version", 5))
    _fails(dec, "field 'version' is 5 (an integer), expected 4 (a newer decograph's export?")


def test_not_json_duplicate_keys_and_nan(dec) -> None:
    (dec / "manifest.json").write_text("{not json")
    _fails(dec, "manifest.json: not valid JSON")
    text = (dec / "manifest.json").read_text()
    (dec / "manifest.json").write_text('{"model": "a", "model": "b"}')
    _fails(dec, "key 'model' appears twice")
    (dec / "manifest.json").write_text('{"model": NaN}')
    _fails(dec, "NaN is not a JSON number")
    (dec / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    _fails(dec, "manifest.json")
    assert text


def test_a_symlinked_manifest_and_a_missing_one(dec, valid_dir) -> None:
    (dec / "manifest.json").unlink()
    _fails(dec, "no manifest.json")
    (dec / "manifest.json").symlink_to(valid_dir / "manifest.json")
    _fails(dec, "manifest.json: not a regular file (a symbolic link?)")


def test_chat_fields(dec) -> None:
    _edit(dec, lambda m: m.__setitem__("chat_prompt", "no placeholder here"))
    _fails(dec, "field 'chat_prompt'", "holding '{prompt}'")
    _edit(dec, lambda m: m.__setitem__("chat_prompt", None))
    _fails(dec, "field 'chat_default' is true but 'chat_prompt' is null")


def test_write_manifest_refuses_what_load_would(tmp_path) -> None:
    (tmp_path / "strategy.json").write_text("{}")
    with pytest.raises(ManifestError, match="field 'graphs.target.num_layers'"):
        write_manifest(tmp_path, {"strategy": "anpd", "passes": "", "program": "strategy.json",
                                  "tokenizer": "strategy.json",
                                  "graphs": {"target": dict(GRAPH, num_layers=0, file="strategy.json")},
                                  "eos_token_ids": [], "chat_prompt": None, "chat_default": False, "model": "m"})
    assert not (tmp_path / "manifest.json").exists()


def test_the_module_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys, decograph.backends.onnxruntime.manifest as m; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
