"""Trained draft heads (EAGLE-style): ``spec`` (config, file format, numpy reference runner),
``store`` (shipped and cached heads per model)."""
from decograph.heads.spec import HeadConfig, HeadWeights, NumpyHead, load_head, save_head
from decograph.heads.store import model_fingerprint, resolve_head

__all__ = ["HeadConfig", "HeadWeights", "NumpyHead", "load_head", "model_fingerprint", "resolve_head", "save_head"]
