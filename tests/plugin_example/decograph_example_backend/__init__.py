"""An example decograph backend plugin, kept out of the decograph package on purpose: it is
found only through its entry point (``decograph.backends``), as a third-party one would be.

It provides two kernel slots in numpy; everything else (the forward, drafting, sampling)
falls back to the torch reference with a ``BackendFallbackWarning``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from decograph.backends import Backend

__all__ = ["NumpyBackend"]


def verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lg = logits.detach().float().cpu().numpy()
    argmax = lg.argmax(-1)
    tok, par = tokens.cpu().numpy(), parents.cpu().numpy()
    ok = np.ones(len(tok), dtype=bool)
    for i in range(1, len(tok)):
        ok[i] = ok[par[i]] and tok[i] == argmax[par[i]]
    return torch.from_numpy(argmax).long(), torch.from_numpy(ok)


def unmask_confidence(logits: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lg = logits.detach().float().cpu().numpy().copy()
    lg[:, mask_id] = -np.inf
    top = lg.max(-1, keepdims=True)
    conf = 1.0 / np.exp(lg - top).sum(-1)
    return torch.from_numpy(conf.astype(np.float32)), torch.from_numpy(lg.argmax(-1)).long()


class NumpyBackend(Backend):
    name = "numpy_example"
    description = "example plugin: numpy greedy verification and confidence unmasking"
    devices = ("cpu",)

    def kernels(self) -> dict[str, Callable[..., Any]]:
        return {"verify.greedy": verify_greedy, "unmask.confidence": unmask_confidence}
