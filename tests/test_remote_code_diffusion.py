"""LLaDA and Dream through ``trust_remote_code``: their files cannot be had offline, so this test
writes a tiny masked-diffusion model the way they ship (a config and a model class in the model
directory, named by ``auto_map``; ``model_type`` ``llada``, or ``dream`` with shifted logits)
and loads it as a user would. ``llada`` (one token per step) equals an independent
lowest-confidence loop over the model's own forward; the mask token comes from the config;
without ``trust_remote_code`` the error names the flag; a model without a mask token is refused
before its weights load."""
from __future__ import annotations

import json
import sys
from importlib import import_module

import pytest
import torch

import decograph
from decograph.errors import ModelError
from decograph.models.diffusion import load_diffusion_model

MASK, V = 47, 48

CONFIG = '''
from transformers import PretrainedConfig


class TinyDiffusionConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, vocab_size=48, hidden_size=32, layers=2, heads=4, max_sequence_length=64, shift=False,
                 **kwargs):
        self.vocab_size, self.hidden_size, self.layers, self.heads = vocab_size, hidden_size, layers, heads
        self.max_sequence_length, self.shift = max_sequence_length, shift
        super().__init__(**kwargs)
'''

MODEL = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_tiny import TinyDiffusionConfig


class TinyDiffusionModel(PreTrainedModel):
    """A bidirectional transformer over the whole sequence (LLaDA's shape of forward)."""

    config_class = TinyDiffusionConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_sequence_length, config.hidden_size)
        layer = nn.TransformerEncoderLayer(config.hidden_size, config.heads, 2 * config.hidden_size,
                                           dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, config.layers)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.5)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids) + self.pos(torch.arange(input_ids.shape[1])[None])
        pad = None if attention_mask is None else attention_mask == 0
        return MaskedLMOutput(logits=self.head(self.body(x, src_key_padding_mask=pad)))
'''


def write_model(path, model_type: str = "llada", mask: int | None = MASK, seed: int = 0):
    """A model directory as LLaDA/Dream ship theirs: code files plus config.json's ``auto_map``."""
    path.mkdir(parents=True)
    (path / "configuration_tiny.py").write_text(CONFIG.replace('"llada"', repr(model_type).replace("'", '"')))
    (path / "modeling_tiny.py").write_text(MODEL)
    sys.path.insert(0, str(path.parent))
    try:                                        # the classes, to write the weights with
        modeling = import_module(f"{path.name}.modeling_tiny")
    finally:
        sys.path.remove(str(path.parent))
        for name in [n for n in sys.modules if n == path.name or n.startswith(path.name + ".")]:
            del sys.modules[name]
    cfg = modeling.TinyDiffusionConfig(shift=model_type == "dream")
    if mask is not None:
        cfg.mask_token_id = mask
    torch.manual_seed(seed)
    modeling.TinyDiffusionModel(cfg).save_pretrained(path)
    conf = json.loads((path / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_tiny.TinyDiffusionConfig",
                        "AutoModel": "modeling_tiny.TinyDiffusionModel"}
    (path / "config.json").write_text(json.dumps(conf))
    return path


def reference(model, prompt: list[int], n: int, shift: bool) -> list[int]:
    """LLaDA's baseline, one token per step: fill the most confident masked position (mask token
    excluded) with its argmax, on whole-sequence forwards; Dream's logits at i predict i + 1."""
    x = list(prompt) + [MASK] * n
    p = len(prompt)
    while MASK in x[p:]:
        with torch.no_grad():
            lg = model(torch.tensor([x])).logits[0].float()
        if shift:
            lg = torch.cat([lg[:1], lg[:-1]])
        lg[:, MASK] = float("-inf")
        masked = [g for g in range(n) if x[p + g] == MASK]
        conf, tok = torch.softmax(lg[[p + g for g in masked]], -1).max(-1)
        best = max(range(len(masked)), key=lambda i: (float(conf[i]), -i))
        x[p + masked[best]] = int(tok[best])
    return x[p:]


@pytest.mark.parametrize("model_type", ["llada", "dream"])
def test_remote_code_model_runs_unmask_strategies(tmp_path, model_type) -> None:
    d = write_model(tmp_path / f"tiny_{model_type}", model_type)
    with pytest.raises(ModelError, match=r"trust_remote_code"):
        load_diffusion_model(d)
    adapter = load_diffusion_model(d, trust_remote_code=True)
    assert adapter.mask_token_id == MASK and adapter.shift_logits == (model_type == "dream")
    prompts = [[3, 4, 5, 6], [7, 8]]
    got = decograph.generate(adapter, None, prompts, "llada", 8, overrides={"k": 1}, eos_token_id=[], passes="none")
    assert [r.new_token_ids for r in got] == [reference(adapter.model, p, 8, model_type == "dream") for p in prompts]
    fast = decograph.generate(adapter, None, prompts, "fast_dllm", 8, eos_token_id=[],
                              overrides={"kv": "recompute", "threshold": 0.5, "block": 4})
    assert all(len(r.new_token_ids) == 8 and MASK not in r.new_token_ids for r in fast)


def test_a_remote_code_model_without_a_mask_token_is_refused(tmp_path) -> None:
    d = write_model(tmp_path / "tiny_nomask", mask=None)
    with pytest.raises(ModelError, match=r"no mask token"):
        load_diffusion_model(d, trust_remote_code=True)


def test_the_cli_and_resolve_model_pass_trust_remote_code(tmp_path, capsys) -> None:
    from decograph.api import resolve_model
    from decograph.cli import main

    d = write_model(tmp_path / "tiny_cli", "llada")
    assert main(["run", "--model", str(d), "--strategy", "llada", "--prompt", "hi"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    adapter, _ = resolve_model(str(d), trust_remote_code=True)
    assert adapter.mask_token_id == MASK
