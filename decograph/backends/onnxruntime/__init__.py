"""The ONNX Runtime path: export a model's decoding step (``export``) and drive the exported
graph with ORT sessions as a causal-LM adapter (``session``), so every strategy runs on it."""
