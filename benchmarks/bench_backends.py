"""Backends and the exported decoder compared on this machine, default model, same prompts, one process.

For each backend (torch fp32, ONNX Runtime fp32, ONNX Runtime int4 and int8 weight-only) and
each strategy (``greedy`` and the best lossless strategy ``anpd``): tokens/s (median of
``--reps``), speedup over torch greedy, and the share of outputs identical to that backend's
own greedy decoding (lossless on a quantized graph means exactly that). Also each backend's
forward-cost curve: the time of a forward over k query tokens over the time of one token, at
a context of ``--context`` tokens.

Then the exported decoder (``decograph export anpd DIR --quant int4``, run without torch,
``decograph.exported``): its greedy (``draft=False``, one token per forward: the reference) and
ANPD, interleaved per prompt (each system's repetitions back to back, the systems' order
rotated per prompt), end-to-end
tokens/s (prompt forward included) and decode-only tokens/s (after the prompt's forward), the
share of ANPD outputs identical to the exported greedy, and the runner's own measured cost
curve; with ``--genai`` (default, when installed) onnxruntime-genai's greedy and its n-gram
speculation on its own int4 export of the model join the rotation, on the same prompts, end to
end (prompt processing included) like the others; genai's n-gram outputs are compared with genai's greedy. The exported decoder's part
runs once per length in ``--max-new-tokens`` (the backends' part at the first). llama.cpp:
``bench_external.py``.

    python benchmarks/bench_backends.py [--per-category 2] [--max-new-tokens 64 256] [--reps 3]
        [--backends torch,onnxruntime,onnxruntime-int4,onnxruntime-int8] [--exported int4,int8] [--no-genai]
        [--spinning on|off] [--exported-plans jacobi,lookahead] [--batch 4] [--ceiling]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.api import as_program, generate, resolve_model  # noqa: E402
from decograph.backends import BackendFallbackWarning, get_backend  # noqa: E402
from decograph.backends.torch_ref.cost import measure_cost_curve  # noqa: E402
from decograph.models.default import load_default_model  # noqa: E402

BACKENDS = ["torch", "onnxruntime", "onnxruntime-int4", "onnxruntime-int8"]
STRATEGIES = ["greedy", "anpd"]


def prompts(tok, per_category: int, path: str | None = None, chat: bool = True) -> list[list[int]]:
    data = Path(path) if path else HERE / "data" / "spec_bench_questions.jsonl"
    by_cat: dict[str, list[str]] = {}
    for line in data.read_text().splitlines():
        q = json.loads(line)
        by_cat.setdefault(q["category"], []).append(q["turns"][0])
    out = []
    for qs in by_cat.values():
        for q in qs[:per_category]:
            if chat:
                ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=True)
            else:                                   # a base model: the question as raw text
                ids = tok(q)["input_ids"]
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


def bench_backends(model, tok, ps, backends: list[str], args) -> tuple[list[dict], dict]:
    base = resolve_model(model)[0]
    curves = {b: cost_curve(get_backend(b).prepare(base), args.context) for b in backends}
    for b in backends:                                                  # warm-up (and export once)
        for s in STRATEGIES:
            generate(model, tok, [ps[0]], s, 8, backend=b)
    rows: dict[tuple[str, str], dict[str, list]] = {(b, s): {"tps": [], "ids": []} for b in backends for s in STRATEGIES}
    for i, p in enumerate(ps):
        for b in backends:
            for s in STRATEGIES:
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    [r] = generate(model, tok, [p], s, args.max_new_tokens[0], backend=b)
                    times.append(time.perf_counter() - t0)
                rows[(b, s)]["tps"].append(len(r.new_token_ids) / statistics.median(times))
                rows[(b, s)]["ids"].append(r.new_token_ids)
        print(f"prompt {i + 1}/{len(ps)}: " + ", ".join(f"{b}/{s} {rows[(b, s)]['tps'][-1]:.1f}"
                                                      for b in backends for s in STRATEGIES), file=sys.stderr)
    ref_rows = rows.get(("torch", "greedy"))
    ref = statistics.mean(ref_rows["tps"]) if ref_rows else None
    table = []
    for (b, s), m in rows.items():
        own = rows[(b, "greedy")]["ids"]
        tps = statistics.mean(m["tps"])
        row = {"backend": b, "strategy": s, "max_new_tokens": args.max_new_tokens[0], "tokens_per_s": round(tps, 1),
               "speedup_vs_torch_greedy": round(tps / ref, 2) if ref else None,
               "identical_to_own_greedy": f"{sum(a == g for a, g in zip(m['ids'], own))}/{len(own)}"}
        if ref_rows:
            row["identical_to_torch_greedy"] = f"{sum(a == g for a, g in zip(m['ids'], ref_rows['ids']))}/{len(own)}"
        table.append(row)
    return table, curves


def bench_exported(model, tok, ps, quant: str, args, genai=None) -> tuple[list[dict], dict]:
    """The exported decoder's greedy and ANPD (and onnxruntime-genai's greedy on its own int4
    export, when given), interleaved per prompt and repetition: genai, greedy, anpd, genai, ...;
    once per generation length in ``--max-new-tokens``, from one export."""
    from decograph.export import export_decoder
    from decograph.exported import ExportedDecoder
    from decograph.models.adapters import HFCausalLM

    tmp = Path(tempfile.mkdtemp(prefix="bench-exported-"))
    try:
        out = export_decoder(args.export_strategy, tmp / "dec", model=HFCausalLM(model, tok), quant=quant,
                             block_size=args.block_size, head_quant=args.head_quant,
                             progress=lambda m: None)
        dec = ExportedDecoder(out, threads=2, spinning=args.spinning == "on")
        curve = dec.cost_curve()                      # measured once per graph and machine (cached)
        table = []
        for n in args.max_new_tokens:
            table += _exported_rows(dec, ps, quant, n, args, genai)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return table, {str(k): round(curve[k - 1], 3) for k in (1, 2, 4, 8) if k <= len(curve)}




def _exported_rows(dec, ps, quant: str, n: int, args, genai) -> list[dict]:
    systems = {"greedy": lambda p: _exported(dec, p, n, False),
               args.export_strategy: lambda p: _exported(dec, p, n, True)}
    for name in [x for x in args.exported_plans.split(",") if x]:
        systems[name] = lambda p, d=dec.with_program(as_program(name)): _exported(d, p, n, True)
    if args.ceiling:
        answers: dict = {}
        systems["ceiling"] = lambda p: _ceiling(dec, p, n, answers)
    if genai:
        systems = {f"ort_genai_{k}": (lambda p, g=g: _genai(g, p, n)) for k, g in genai.items()} | systems
    if args.torch_rows:
        systems = _torch_systems(args.torch_rows, args.export_strategy, n) | systems
    if args.inprocess and quant in ("int4", "int8"):
        model, tok = args.inprocess
        for k in ("greedy", "anpd"):
            systems[f"inprocess_{k}"] = lambda p, k=k: _inprocess(model, tok, p, n, k, f"onnxruntime-{quant}")
    for run in systems.values():                  # warm-up
        run(ps[0])
    stats = {m: {"e2e": [], "decode": [], "ids": [], "forwards": 0, "drafted": 0, "accepted": 0, "draft_s": 0.0} for m in systems}
    names = list(systems)
    for i, p in enumerate(ps):
        runs: dict[str, list] = {m: [] for m in systems}
        # each system's repetitions back to back (the median is of runs after its own: a run
        # right after another engine's shares the cores with that engine's threads while they
        # still spin, and finds its own asleep), systems in an order rotated per prompt
        turn = i % len(names)
        for m in names[turn:] + names[:turn]:
            for _ in range(args.torch_reps if m.startswith(("hf_", "torch_")) else args.reps):
                runs[m].append(systems[m](p))
        for m, rs in runs.items():
            st = stats[m]
            ids, _, _, s0 = rs[0]
            st["ids"].append(ids)
            st["e2e"].append(len(ids) / statistics.median(r[1] for r in rs))
            if s0 is not None:
                if not m.startswith(("hf_", "torch_")):
                    st["decode"].append((len(ids) - 1) / statistics.median(r[1] - r[2] for r in rs))
                st["forwards"] += s0.forwards
                st["drafted"] += s0.drafted
                st["accepted"] += s0.accepted
                st["draft_s"] += getattr(s0, "draft_s", 0.0)
        print(f"exported-{quant} {n} tokens, prompt {i + 1}/{len(ps)}: " + ", ".join(
            f"{m} {stats[m]['e2e'][-1]:.1f}" for m in systems), file=sys.stderr)
    greedy = stats["greedy"]
    table = []
    for m, st in stats.items():
        tokens = sum(map(len, st["ids"]))
        name = f"exported-{quant}" + (f"-b{args.block_size}" if args.block_size != 32 and quant != "none" else "")
        backend = ("onnxruntime-genai int4" if m.startswith("ort_genai") else
                   f"in-process onnxruntime-{quant}" if m.startswith("inprocess_") else
                   "Hugging Face (torch fp32)" if m.startswith("hf_") else
                   "decograph torch fp32" if m.startswith("torch_") else name)
        strategy = m.removeprefix("ort_genai_").removeprefix("inprocess_").removeprefix("hf_").removeprefix("torch_")
        row = {"backend": backend, "strategy": strategy, "max_new_tokens": n,
               "tokens_per_s": round(statistics.mean(st["e2e"]), 1),
               "speedup_vs_exported_greedy": round(statistics.mean(st["e2e"]) / statistics.mean(greedy["e2e"]), 3)}
        if genai:
            row["speedup_vs_genai_greedy"] = round(statistics.mean(st["e2e"]) /
                                                   statistics.mean(stats["ort_genai_greedy"]["e2e"]), 3)
        if m.startswith(("hf_", "torch_")):        # torch fp32: lossless means Hugging Face greedy's tokens
            own = stats["hf_greedy"]["ids"]
            row["identical_to_own_greedy"] = f"{sum(a == g for a, g in zip(st['ids'], own))}/{len(ps)} (HF greedy)"
            if st["forwards"]:
                row["tokens_per_forward"] = round(tokens / st["forwards"], 3)
            row["speedup_vs_hf_greedy"] = round(statistics.mean(st["e2e"]) / statistics.mean(stats["hf_greedy"]["e2e"]), 3)
        elif st["decode"]:
            row |= {"decode_tokens_per_s": round(statistics.mean(st["decode"]), 1),
                    "identical_to_own_greedy": f"{sum(a == g for a, g in zip(st['ids'], greedy['ids']))}/{len(ps)}",
                    "tokens_per_forward": round(tokens / st["forwards"], 3),
                    "draft_ms_per_forward": round(1e3 * st["draft_s"] / st["forwards"], 3),
                    "drafted": st["drafted"], "accepted": st["accepted"]}
        elif m.startswith("inprocess_"):        # the same graph's tokens: the exported greedy's
            row["identical_to_own_greedy"] = f"{sum(a == g for a, g in zip(st['ids'], greedy['ids']))}/{len(ps)}"
            row["speedup_vs_same_exported"] = round(statistics.mean(st["e2e"]) / statistics.mean(
                stats[m.removeprefix("inprocess_")]["e2e"]), 3)
        elif m == "ort_genai_ngram":
            own = stats["ort_genai_greedy"]["ids"]
            row["identical_to_own_greedy"] = f"{sum(a == g for a, g in zip(st['ids'], own))}/{len(ps)}"
        else:
            row["identical_to_own_greedy"] = "-"
        table.append(row)
    return table + [_batch_row(dec, ps, quant, n, b, greedy) for b in args.batch]


def _batch_row(dec, ps, quant: str, n: int, b: int, greedy: dict) -> dict:
    """ANPD with ``b`` prompts per ``generate_batch`` call: total tokens over total time (a
    throughput, the prompts' forwards included), and each row against its own greedy."""
    ids, t0 = [], time.perf_counter()
    for i in range(0, len(ps), b):
        ids += [r[0] for r in dec.generate_batch(ps[i:i + b], n)]
    seconds = time.perf_counter() - t0
    tps = sum(map(len, ids)) / seconds
    return {"backend": f"exported-{quant} batch {b}", "strategy": dec.program.name, "max_new_tokens": n,
            "tokens_per_s": round(tps, 1), "speedup_vs_exported_greedy": round(tps / statistics.mean(greedy["e2e"]), 3),
            "identical_to_own_greedy": f"{sum(a == g for a, g in zip(ids, greedy['ids']))}/{len(ps)}"}


def _ceiling(dec, p: list[int], n: int, answers: dict):
    """The exported program with every corpus holding this prompt's own greedy answer (computed
    first, untimed): drafts that are nearly an oracle's, through the same step graph, draft
    policy and runtime. What better drafts could give at most on this machine."""
    import copy

    from decograph.heads.corpus import build_corpus

    if not dec.corpora:
        raise SystemExit(f"--ceiling: the exported strategy {dec.program.name!r} drafts from no corpus "
                         f"(use --export-strategy eagle_anpd or anpd_corpus)")
    key = tuple(p)
    if key not in answers:
        answers[key] = dec.generate(p, n, draft=False)[0]
    other = copy.copy(dec)
    vocab = next(iter(dec.corpora.values())).vocab_size
    other.corpora = {name: build_corpus([list(p) + answers[key]], vocab) for name in dec.corpora}
    return _exported(other, p, n, True)


def _exported(dec, p: list[int], n: int, draft: bool):
    ids, s = dec.generate(p, n, draft=draft)
    return ids, s.wall_time_s, s.prefill_s, s


def _inprocess(model, tok, p: list[int], n: int, strategy: str, backend: str):
    """The in-process backend through the public API, per call as a user would (program set-up
    included: ~70 ms here)."""
    t0 = time.perf_counter()
    r = generate(model, tok, [p], strategy, n, backend=backend)[0]
    return r.new_token_ids, time.perf_counter() - t0, 0.0, None


def _torch_systems(torch_rows, strategy: str, n: int) -> dict:
    """Hugging Face greedy and prompt lookup (10 tokens, its default), and decograph's greedy and
    ``strategy`` on the torch backend, as systems of the exported decoder's rotation."""
    from decograph.bench.runner import DecographSystem, HFSystem

    model, tok = torch_rows
    systems = [HFSystem("hf_greedy", model), HFSystem("hf_prompt_lookup", model, lookup=10),
               DecographSystem("greedy", model, tok), DecographSystem(strategy, model, tok)]
    names = ["hf_greedy", "hf_prompt_lookup", "torch_greedy", f"torch_{strategy}"]

    def run(system):
        def go(p: list[int]):
            o = system.run(p, n)
            stats = _Counted(o.forwards) if o.forwards else None
            return o.tokens, o.seconds, 0.0, stats
        return go
    return {name: run(s) for name, s in zip(names, systems)}


class _Counted:
    """The forward count of a torch run, in the exported decoder's statistics' shape (the
    decode-only columns stay empty: a torch run does not time its prompt's forward apart)."""

    def __init__(self, forwards: int) -> None:
        self.forwards, self.drafted, self.accepted = forwards, 0, 0


def _genai(system, p: list[int], n: int):
    ids, seconds = system.generate(p, n)
    return ids, seconds, 0.0, None


def _genai_systems(spinning: bool, model: str | None = None) -> dict:
    """onnxruntime-genai's greedy and its n-gram speculation on its own int4 CPU export (built
    once and cached), 2 threads, idle-thread spinning as the exported decoder's; or {}."""
    try:
        from decograph.baselines import model_eos_ids, ortgenai_systems
        from decograph.models.default import default_model_path
        from decograph.models.hub import model_dir

        hf = default_model_path() if model is None else model_dir(model)
        systems = ortgenai_systems(hf, model_eos_ids(hf), spinning, log=lambda m: print(m, file=sys.stderr))
        return {name.removeprefix("ort_genai_"): system for name, system in systems.items()}
    except Exception as e:                          # noqa: BLE001 -- optional baseline
        print(f"onnxruntime-genai not measured: {e}", file=sys.stderr)
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--prompts", default=None, help="a prompts file in Spec-Bench's format (default: Spec-Bench's "
                    "questions), e.g. data/heldout_prompts.jsonl; --per-category applies")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[64],
                    help="generation lengths: the backends run the first; the exported decoder each")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated; empty for none")
    ap.add_argument("--exported", default="int4", help="quantizations of the exported decoder (int4,int8,none); "
                                                       "empty for none")
    ap.add_argument("--export-strategy", default="anpd",
                    help="the strategy exported (its program is the exported decoder's own; e.g. eagle_anpd, whose "
                         "export carries the draft head, so that --exported-plans eagle can run on it too)")
    ap.add_argument("--block-size", type=int, default=32, help="the exported decoder's MatMulNBits block size")
    ap.add_argument("--head-quant", choices=("auto", "none", "int4", "int8"), default="auto",
                    help="the draft head's graph (eagle strategies): float32 (none) or MatMulNBits int8/int4; auto: "
                         "int8 for a quantized export (decograph export's default)")
    ap.add_argument("--exported-plans", default="", help="also these built-in strategies on the exported graph "
                                                         "(e.g. jacobi,lookahead)")
    ap.add_argument("--batch", type=int, nargs="*", default=[], help="also ANPD in batches of these sizes "
                                                                     "(generate_batch; throughput, run once)")
    ap.add_argument("--genai", action=argparse.BooleanOptionalAction, default=True,
                    help="also onnxruntime-genai's greedy and n-gram speculation (its own int4 export), interleaved "
                         "with the exported decoder")
    ap.add_argument("--spinning", choices=("on", "off"), default="on",
                    help="ONNX Runtime idle-thread spinning for the exported decoder and genai (2 threads each): "
                         "on is ORT's default; off is much faster while other work keeps the cores busy")
    ap.add_argument("--inprocess", action="store_true",
                    help="also the in-process onnxruntime-int4/int8 backend's greedy and anpd (api.generate), in the "
                         "exported decoder's rotation: the same code, to be within a few percent of it")
    ap.add_argument("--model", default=None, help="a model directory, a packaged model's name (e.g. gemma3-270m) or a "
                    "Hub id (default: the embedded default model); onnxruntime-genai builds its own export of it")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="apply the chat template to the questions (default: on for the default model, off with --model)")
    ap.add_argument("--torch-rows", action="store_true",
                    help="also Hugging Face greedy and prompt lookup and decograph's greedy and --export-strategy on "
                         "torch fp32, in the exported decoder's rotation (one table, same run)")
    ap.add_argument("--torch-reps", type=int, default=1, help="repetitions of the torch rows (slow: default 1)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also 'ceiling': the exported strategy drafting from a corpus that holds each prompt's own "
                         "greedy answer (near-oracle drafts; needs a strategy with draft.corpus, e.g. eagle_anpd): "
                         "the most better drafts could give with this step graph on this machine")
    ap.add_argument("--out", default=str(HERE / "results" / "backends.json"))
    args = ap.parse_args()
    warnings.simplefilter("ignore", BackendFallbackWarning)
    torch.set_num_threads(2)
    if args.model is None:
        model, tok = load_default_model(progress=False)
    else:
        from decograph.models.adapters import HFCausalLM
        from decograph.models.hub import model_dir

        adapter = HFCausalLM.from_pretrained(str(model_dir(args.model)))
        model, tok = adapter.model, adapter.tokenizer
    chat = args.chat if args.chat is not None else args.model is None
    ps = prompts(tok, args.per_category, args.prompts, chat)
    backends = [b for b in args.backends.split(",") if b]
    table, curves = bench_backends(model, tok, ps, backends, args) if backends else ([], {})
    args.inprocess = (model, tok) if args.inprocess else None
    args.torch_rows = (model, tok) if args.torch_rows else None
    genai = _genai_systems(args.spinning == "on", args.model) if args.genai and args.exported else {}
    for quant in [q for q in args.exported.split(",") if q]:
        rows, curve = bench_exported(model, tok, ps, quant, args, genai)
        table += rows
        curves[f"exported-{quant}"] = curve
    print("| backend | strategy | new tokens | tokens/s | decode-only tokens/s | vs torch (or HF) greedy | vs exported greedy | "
          "vs genai greedy | identical to own greedy | tokens/forward | draft ms/forward |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        r = {"speedup_vs_torch_greedy": r.get("speedup_vs_hf_greedy")} | r
        vs, ve, vg = (f"{r[k]}x" if r.get(k) else "-" for k in ("speedup_vs_torch_greedy", "speedup_vs_exported_greedy",
                                                                  "speedup_vs_genai_greedy"))
        print(f"| {r['backend']} | {r['strategy']} | {r['max_new_tokens']} | {r['tokens_per_s']} | {r.get('decode_tokens_per_s', '-')} | {vs} | "
              f"{ve} | {vg} | {r['identical_to_own_greedy']} | {r.get('tokens_per_forward', '-')} | "
              f"{r.get('draft_ms_per_forward', '-')} |")
    print(f"\nforward-cost curve (time of k query tokens / one token; backends at context {args.context}, "
          f"the exported runner's own measurement at context 128)")
    for b, c in curves.items():
        print(f"{b}: {c}")
    saved = vars(args) | {"inprocess": bool(args.inprocess), "torch_rows": bool(args.torch_rows)}
    Path(args.out).write_text(json.dumps({"args": saved, "rows": table, "cost_curves": curves}, indent=1))


if __name__ == "__main__":
    main()
