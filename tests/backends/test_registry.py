"""The backend registry and protocol: built-ins, entry-point plugins (the example package under
tests/plugin_example, which CI installs), broken and duplicate plugins, fallback warnings, and
whole runs through the Triton and plugin backends giving the reference's tokens (the plugin's
own tests: test_plugin_example.py)."""
from __future__ import annotations

import json
import warnings
from importlib.metadata import EntryPoint

import pytest

import decograph
from decograph.backends import Backend, BackendFallbackWarning, discover, get_backend, plan, registry
from decograph.cli import main
from decograph.errors import BackendError
from decograph.frontends.strategies import load_strategy
from decograph.models.mdm import tiny_mdm
from decograph.models.tiny import tiny_llama


class Good(Backend):
    name = "good"
    description = "a test backend"


class FakeTorch(Backend):
    name = "torch"


class Boom(Backend):
    name = "boom"

    def __init__(self) -> None:
        raise RuntimeError("no device")


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group="decograph.backends")


def test_builtins_and_the_installed_example_plugin() -> None:
    reg = registry(refresh=True)
    assert {"torch", "triton", "numpy_example"} <= set(reg.backends)
    assert reg.origin["torch"] == "built-in"
    assert reg.origin["numpy_example"] == "plugin from decograph-example-backend", \
        "pip install --no-deps -e tests/plugin_example (CI does)"
    assert get_backend("torch").ops >= {"forward", "verify.sampling", "unmask.threshold"}


def test_broken_and_duplicate_plugins_are_named_and_the_rest_load() -> None:
    reg = discover([
        _ep("good", f"{__name__}:Good"),
        _ep("missing", "no_such_module_xyz:Backend"),
        _ep("notabackend", "json:dumps"),
        _ep("boom", f"{__name__}:Boom"),
        _ep("torch", f"{__name__}:FakeTorch"),      # a duplicate of a built-in name
        _ep("renamed", f"{__name__}:Good"),         # entry point name != class name
    ])
    builtin = {"torch", "triton", "onnxruntime", "onnxruntime-int4", "onnxruntime-int8"}
    assert set(reg.backends) == builtin | {"good"} and reg.origin["good"].startswith("plugin")
    errors = "\n".join(reg.errors)
    assert "backend 'missing'" in errors and "ModuleNotFoundError" in errors
    assert "backend 'notabackend'" in errors and "not a decograph.backends.Backend subclass" in errors
    assert "backend 'boom'" in errors and "construction failed: RuntimeError: no device" in errors
    assert "backend 'torch'" in errors and "duplicate name, already provided by built-in" in errors
    assert "backend 'renamed'" in errors and "named 'good'" in errors
    assert len(reg.errors) == 5


def test_unknown_and_unavailable_backends(monkeypatch) -> None:
    with pytest.raises(BackendError, match="unknown backend 'cuda_magic'; available: .*torch"):
        get_backend("cuda_magic")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="cannot run here: no CUDA GPU; set TRITON_INTERPRET=1"):
            get_backend("triton")
    with pytest.raises(BackendError, match="unknown backend"):
        decograph.generate(tiny_llama(), None, [[1, 2]], "greedy", 2, backend="cuda_magic")


class KernelsOnly(Backend):
    """Two kernel slots (the example plugin's numpy kernels) and the torch engine for the rest."""

    name = "kernels_only"

    def kernels(self) -> dict:
        from decograph_example_backend import unmask_confidence, verify_greedy

        return {"verify.greedy": verify_greedy, "unmask.confidence": unmask_confidence}


def test_plan_and_fallback_warnings() -> None:
    program = load_strategy("anpd").program
    assert set(plan(get_backend("torch"), program, warn=False).values()) == {"native"}
    with pytest.warns(BackendFallbackWarning, match="backend 'kernels_only' has no kernel for `forward`"):
        p = plan(KernelsOnly(), program)
    assert p["verify.greedy"] == "native" and p["forward"] == "fallback" and p["draft.adaptive_ngram"] == "native"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan(KernelsOnly(), load_strategy("fast_dllm").program)
    assert [str(w.message).split("`")[1] for w in caught] == ["forward"]       # unmask is native
    # the example plugin forwards the model itself (tests/backends/test_plugin_example.py)
    assert set(plan(get_backend("numpy_example"), program).values()) == {"native"}


@pytest.mark.parametrize("backend", ["numpy_example", "triton"])
@pytest.mark.parametrize("strategy", ["anpd", "lookahead", "greedy"])
def test_causal_strategies_through_backends_give_the_reference_tokens(backend: str, strategy: str) -> None:
    model = tiny_llama()
    prompts = [[1, 5, 9, 5, 9, 5, 9, 5], [3, 4, 3, 4, 3]]
    ref = decograph.generate(model, None, prompts, strategy, 12, eos_token_id=[])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decograph.generate(model, None, prompts, strategy, 12, eos_token_id=[], backend=backend)
    assert [r.new_token_ids for r in out] == [r.new_token_ids for r in ref]
    fallbacks = {str(w.message).split("`")[1] for w in caught if issubclass(w.category, BackendFallbackWarning)}
    # triton runs every op of these (attention through transformers' registry); the plugin runs the model
    assert fallbacks == set()


@pytest.mark.parametrize("backend", ["numpy_example", "triton"])
def test_unmask_strategies_through_backends_give_the_reference_tokens(backend: str) -> None:
    model = tiny_mdm(n_layers=2, seed=3)
    prompts = [[5, 6, 7, 8], [9, 10]]
    for strategy in ("fast_dllm", "lud", "llada_semi_ar"):
        ref = decograph.generate(model, None, prompts, strategy, 16, overrides={"block": 4} if strategy != "llada_semi_ar" else None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BackendFallbackWarning)   # forward: the MDM has no kernel hook
            out = decograph.generate(model, None, prompts, strategy, 16, backend=backend,
                                     overrides={"block": 4} if strategy != "llada_semi_ar" else None)
        assert [r.new_token_ids for r in out] == [r.new_token_ids for r in ref]


def test_cli_backends(capsys) -> None:
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "numpy_example" in out and "plugin from decograph-example-backend" in out
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in data["backends"]]
    assert names == sorted(names) and "triton" in names and data["errors"] == []
