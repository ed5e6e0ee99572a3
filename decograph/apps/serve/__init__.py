"""``decograph serve``: an OpenAI-compatible server with continuous batching.

- ``decograph.apps.serve.models``: what is served (an in-process ``decograph.api.Decoder`` on
  any backend, or an exported decoder directory without torch), its chat template;
- ``decograph.apps.serve.app``: the FastAPI app (completions, chat completions, models,
  health, Prometheus metrics; SSE streaming; OpenAI-style errors);
- ``decograph.apps.serve.metrics``: the metrics;
- ``decograph.apps.serve.cli``: the command (uvicorn; SIGTERM drains in-flight requests).

The scheduling (continuous batching, lanes, cancellation) is the runtime's
(``decograph.runtime.scheduler``): every backend serves through it.
"""
