"""Backends compared on this machine, default model, same prompts, one process.

For each backend (torch fp32, ONNX Runtime fp32, ONNX Runtime int4 and int8 weight-only) and
each strategy (``greedy`` and the best lossless strategy ``anpd``): tokens/s (median of
``--reps``), speedup over torch greedy, and the share of outputs identical to that backend's
own greedy decoding (lossless on a quantized graph means exactly that). Also each backend's
forward-cost curve: the time of a forward over k query tokens over the time of one token, at
a context of ``--context`` tokens. onnxruntime-genai and llama-cpp-python are measured when
installed (they are not installed here; the task's figures for them are quoted in the README).

    python benchmarks/bench_backends.py [--per-category 2] [--max-new-tokens 64] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.api import generate, resolve_model  # noqa: E402
from decograph.backends import BackendFallbackWarning, get_backend  # noqa: E402
from decograph.backends.torch_ref.cost import measure_cost_curve  # noqa: E402
from decograph.models.default import load_default_model  # noqa: E402

BACKENDS = ["torch", "onnxruntime", "onnxruntime-int4", "onnxruntime-int8"]
STRATEGIES = ["greedy", "anpd"]


def prompts(tok, per_category: int) -> list[list[int]]:
    data = HERE / "data" / "spec_bench_questions.jsonl"
    by_cat: dict[str, list[str]] = {}
    for line in data.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out = []
    for qs in by_cat.values():
        for q in qs[:per_category]:
            ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids)[-300:])
    return out


def cost_curve(adapter, context: int) -> dict:
    """The runtime's own measurement (``measure_cost_curve``), plus the one-token time."""
    curve = measure_cost_curve(adapter, context)
    cache = adapter.new_cache(1)
    adapter.forward(cache, torch.ones(1, context, dtype=torch.long), torch.arange(context)[None],
                    torch.ones(1, context, context, dtype=torch.bool).tril())
    t0 = time.perf_counter()
    adapter.forward(cache, torch.ones(1, 1, dtype=torch.long), torch.tensor([[context]]),
                    torch.ones(1, 1, context + 1, dtype=torch.bool))
    return {k: round(v, 3) for k, v in curve.points.items()} | {"one_token_ms": round(1000 * (time.perf_counter() - t0), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--out", default=str(HERE / "results" / "backends.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore", BackendFallbackWarning)
    torch.set_num_threads(2)
    model, tok = load_default_model(progress=False)
    ps = prompts(tok, args.per_category)
    base = resolve_model(model)[0]
    curves = {b: cost_curve(get_backend(b).prepare(base), args.context) for b in BACKENDS}
    for b in BACKENDS:                                                  # warm-up (and export once)
        for s in STRATEGIES:
            generate(model, tok, [ps[0]], s, 8, backend=b)
    rows: dict[tuple[str, str], dict[str, list]] = {(b, s): {"tps": [], "ids": []} for b in BACKENDS for s in STRATEGIES}
    for i, p in enumerate(ps):
        for b in BACKENDS:
            for s in STRATEGIES:
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    [r] = generate(model, tok, [p], s, args.max_new_tokens, backend=b)
                    times.append(time.perf_counter() - t0)
                rows[(b, s)]["tps"].append(len(r.new_token_ids) / statistics.median(times))
                rows[(b, s)]["ids"].append(r.new_token_ids)
        print(f"prompt {i + 1}/{len(ps)}: " + ", ".join(f"{b}/{s} {rows[(b, s)]['tps'][-1]:.1f}"
                                                      for b in BACKENDS for s in STRATEGIES), file=sys.stderr)
    ref = statistics.mean(rows[("torch", "greedy")]["tps"])
    table = []
    for (b, s), m in rows.items():
        own = rows[(b, "greedy")]["ids"]
        same = sum(a == g for a, g in zip(m["ids"], own))
        torch_same = sum(a == g for a, g in zip(m["ids"], rows[("torch", "greedy")]["ids"]))
        tps = statistics.mean(m["tps"])
        table.append({"backend": b, "strategy": s, "tokens_per_s": round(tps, 1), "speedup_vs_torch_greedy": round(tps / ref, 2),
                      "identical_to_own_greedy": f"{same}/{len(own)}", "identical_to_torch_greedy": f"{torch_same}/{len(own)}"})
    print("| backend | strategy | tokens/s | vs torch greedy | identical to own greedy | identical to torch greedy |")
    print("|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['backend']} | {r['strategy']} | {r['tokens_per_s']} | {r['speedup_vs_torch_greedy']}x | "
              f"{r['identical_to_own_greedy']} | {r['identical_to_torch_greedy']} |")
    print("\nforward-cost curve (time of k query tokens / one token; context", args.context, ")")
    for b, c in curves.items():
        print(f"{b}: {c}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": table, "cost_curves": curves}, indent=1))


if __name__ == "__main__":
    main()
