"""Model names as Hugging Face resolves them (``decograph.models.hub``): a local directory, a
packaged name, a Hub id from the local Hugging Face cache, a download, offline mode, and the
errors. No test reaches the network: each builds a Hugging Face cache in the hub layout
(``models--org--name/refs/<branch>``, ``snapshots/<sha>/``) under a temporary directory, and a
download is a stand-in for ``huggingface_hub.snapshot_download`` that fills that cache."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError

from decograph.api import generate, resolve_model
from decograph.cli import main
from decograph.errors import ModelError
from decograph.models.hub import hub_model_dir, is_hub_id, model_dir, split_revision
from decograph.models.tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
SHA_MAIN, SHA_V1 = "a" * 40, "b" * 40
PROMPT = [5, 9, 13, 2]


def put_in_cache(cache: Path, repo: str, source: Path, sha: str, ref: str | None = "main") -> Path:
    """``source``'s files as snapshot ``sha`` of ``repo`` in the cache ``cache``, ``ref`` pointing at it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / sha
    shutil.copytree(source, snap)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny models that decode differently (seeds 0 and 1)."""
    return {"main": tiny_model_dir(tmp_path_factory.mktemp("main")),
            "v1": tiny_model_dir(tmp_path_factory.mktemp("v1"), seed=1)}


@pytest.fixture
def hf_cache(tmp_path: Path, tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache holding ``org/tiny`` (main: seed 0; branch v1: seed 1), as this
    process's cache (huggingface_hub reads HF_HOME when imported), online by default."""
    cache = tmp_path / "hf" / "hub"
    put_in_cache(cache, "org/tiny", tiny_dirs["main"], SHA_MAIN)
    put_in_cache(cache, "org/tiny", tiny_dirs["v1"], SHA_V1, ref="v1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """``snapshot_download`` fails as without a network for online calls (cache lookups run
    unchanged); the calls made online are recorded."""
    real, online = huggingface_hub.snapshot_download, []

    def fake(repo_id: str, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        online.append({"repo_id": repo_id, **kw})
        raise LocalEntryNotFoundError("Got: ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return online


def test_ids_and_revisions_are_told_apart() -> None:
    assert is_hub_id("org/name") and is_hub_id("gpt2") and is_hub_id("org/name@v1.0")
    assert not is_hub_id("./dir") and not is_hub_id("/abs/dir") and not is_hub_id("a/b/c")
    assert split_revision("org/name@v1") == ("org/name", "v1")
    assert split_revision("org/name", "v1") == ("org/name", "v1")
    with pytest.raises(ModelError, match="give the revision once"):
        split_revision("org/name@v1", "v2")


def test_a_cached_id_resolves_to_its_snapshot_without_the_network(hf_cache: Path, no_network: list) -> None:
    path = model_dir("org/tiny")
    assert path.name == SHA_MAIN and path.parent.name == "snapshots"
    assert model_dir("org/tiny@v1").name == SHA_V1
    assert model_dir("org/tiny", revision="v1").name == SHA_V1
    assert model_dir(f"org/tiny@{SHA_V1}").name == SHA_V1        # a commit, not only a branch
    assert no_network == []


def test_the_api_decodes_a_cached_id_as_its_directory(hf_cache: Path, tiny_dirs: dict[str, Path],
                                                      no_network: list) -> None:
    [by_id] = generate("org/tiny", None, [PROMPT], "anpd", 8)
    [by_dir] = generate(str(tiny_dirs["main"]), None, [PROMPT], "anpd", 8)
    [by_rev] = generate("org/tiny@v1", None, [PROMPT], "anpd", 8)
    [by_rev_dir] = generate(str(tiny_dirs["v1"]), None, [PROMPT], "anpd", 8)
    assert by_id.new_token_ids == by_dir.new_token_ids and by_rev.new_token_ids == by_rev_dir.new_token_ids
    assert by_id.new_token_ids != by_rev.new_token_ids
    adapter, tok = resolve_model("org/tiny", revision="v1")
    assert tok is not None and adapter.vocab_size == 64


def test_a_local_directory_comes_before_a_hub_id_of_the_same_name(hf_cache: Path, tiny_dirs: dict[str, Path],
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(tiny_dirs["v1"], tmp_path / "work" / "org" / "tiny")
    monkeypatch.chdir(tmp_path / "work")
    assert model_dir("org/tiny") == Path("org/tiny")


def test_offline_and_not_cached_names_the_id_and_what_to_do(hf_cache: Path, no_network: list,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert model_dir("org/tiny").name == SHA_MAIN               # cached: offline is no obstacle
    with pytest.raises(ModelError) as err:
        model_dir("org/missing")
    text = str(err.value)
    assert "'org/missing'" in text and "offline" in text and "hf download org/missing" in text
    with pytest.raises(ModelError, match="'org/tiny@v2' is not in the local Hugging Face cache"):
        model_dir("org/tiny@v2")
    assert no_network == []


def test_unreachable_and_not_cached_names_the_id(hf_cache: Path, no_network: list) -> None:
    with pytest.raises(ModelError) as err:
        model_dir("org/missing")
    text = str(err.value)
    assert "'org/missing'" in text and "could not be downloaded" in text and "ConnectError" in text
    assert [c["repo_id"] for c in no_network] == ["org/missing"]


def test_an_incomplete_snapshot_is_downloaded_again_unless_offline(hf_cache: Path, tiny_dirs: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    snap = hf_cache / "models--org--partial" / "snapshots" / SHA_MAIN
    snap.mkdir(parents=True)
    shutil.copy(tiny_dirs["main"] / "config.json", snap)          # what a config-only fetch leaves
    (hf_cache / "models--org--partial" / "refs").mkdir()
    (hf_cache / "models--org--partial" / "refs" / "main").write_text(SHA_MAIN)
    calls = []

    def download(repo_id: str, revision: str | None = None, cache_dir: str | None = None, allow_patterns=None,
                 local_files_only: bool = False) -> str:
        if local_files_only:
            return str(snap)
        calls.append((repo_id, revision, allow_patterns))
        for f in tiny_dirs["main"].iterdir():
            shutil.copy(f, snap)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="'org/partial' is incomplete in the local Hugging Face cache"):
        hub_model_dir("org/partial")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub_model_dir("org/partial") == snap
    [(repo, rev, patterns)] = calls
    assert repo == "org/partial" and rev is None and "*.safetensors" in patterns and "*.bin" not in patterns
    assert generate("org/partial", None, [PROMPT], "greedy", 4)[0].stats.new_tokens == 4


def test_a_name_that_is_nothing_is_refused() -> None:
    with pytest.raises(ModelError, match="no such directory, packaged model .* or Hugging Face Hub id"):
        model_dir("./no/such/dir")


# ---------------------------------------------------------------- the command line


def test_run_decodes_a_cached_hub_id(hf_cache: Path, tiny_dirs: dict[str, Path], no_network: list,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["run", "--strategy", "ngram", "--prompt", "t5 t9 t13 t2", "--max-new-tokens", "6", "--json"]
    assert main([*args, "--model", "org/tiny"]) == 0
    by_id = json.loads(capsys.readouterr().out)
    assert main([*args, "--model", str(tiny_dirs["main"])]) == 0
    by_dir = json.loads(capsys.readouterr().out)
    assert by_id["model"] == "org/tiny" and by_id["new_token_ids"] == by_dir["new_token_ids"]
    assert by_id["chat"] is False                   # a base model: its tokenizer has no chat template


def test_run_with_a_missing_id_exits_2_naming_it(hf_cache: Path, no_network: list,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", "--strategy", "greedy", "--model", "org/missing", "--prompt", "t1"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("decograph: error: ") and "'org/missing'" in err


def test_bench_resolves_hub_ids_too(hf_cache: Path, no_network: list) -> None:
    from decograph.bench import _load

    model, tok, name = _load("org/tiny")
    assert name == "org/tiny" and model.config.vocab_size == 64 and tok is not None


def test_run_chats_by_default_where_the_tokenizer_has_a_template(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    chatty = tmp_path / "chatty"
    shutil.copytree(tiny_dirs["main"], chatty)
    cfg = json.loads((chatty / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}t7 {{ m['content'] }} t8 {% endfor %}"
    (chatty / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = ["run", "--strategy", "greedy", "--prompt", "t5 t9", "--max-new-tokens", "3", "--json", "--model"]
    assert main([*args, str(chatty)]) == 0
    assert json.loads(capsys.readouterr().out)["chat"] is True
    assert main([*args, str(chatty), "--no-chat"]) == 0
    assert json.loads(capsys.readouterr().out)["chat"] is False


def test_the_command_honours_hf_home_and_offline_mode(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    """A fresh process, configured only through the environment as a user configures it."""
    put_in_cache(tmp_path / "home" / "hub", "org/tiny", tiny_dirs["main"], SHA_MAIN)
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "decograph", "run", "--strategy", "greedy", "--prompt", "t5 t9", "--json",
           "--max-new-tokens", "3", "--model"]
    ok = subprocess.run([*cmd, "org/tiny"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads(ok.stdout)["new_tokens"] == 3
    bad = subprocess.run([*cmd, "org/missing@v2"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "'org/missing@v2'" in bad.stderr and "offline" in bad.stderr


def test_export_takes_a_hub_id(hf_cache: Path, no_network: list, tmp_path: Path, private_cache) -> None:
    from decograph.export import export_decoder

    out = export_decoder("greedy", tmp_path / "dec", model="org/tiny", chat=False, progress=lambda m: None)
    assert out.is_dir() and any(out.glob("*.onnx")) and no_network == []
