"""Strategies vs Hugging Face greedy and prompt lookup, same model, same prompts, one process.

    python benchmarks/bench_strategies.py --per-category 3 --max-new-tokens 128

For every prompt (Spec-Bench questions, first turn, chat template; the eight MT-bench
categories map to the task ``mt_bench`` as Spec-Bench's own evaluation does) the systems run
back to back in a rotating order, after a warm-up. Every lossless strategy's tokens are
checked against HF greedy's; a mismatch is reported with the first differing step and the
logit margin there (a near-tie in fp32 is the only legitimate cause). Writes JSON and a
Markdown table to ``benchmarks/results/``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import decograph.api as api
from decograph.frontends.strategies import load_strategy
from decograph.models.default import load_default_model

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
TASKS = ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
DATA = Path(__file__).resolve().parent / "data" / "spec_bench_questions.jsonl"


def load_prompts(path: Path, per_category: int) -> list[tuple[str, str]]:
    """(task, question) pairs: the first ``per_category`` questions of each Spec-Bench task."""
    by_task: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text().splitlines():
        q = json.loads(line)
        task = "mt_bench" if q["category"] in MT_BENCH else q["category"]
        by_task[task].append(q["turns"][0])
    return [(t, q) for t in TASKS for q in by_task[t][:per_category]]


def hf_run(model, ids: list[int], n: int, lookup: int) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    kw = {"prompt_lookup_num_tokens": lookup} if lookup else {}
    t = time.perf_counter()
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.generation_config.eos_token_id, **kw)
    return out[0, len(ids):].tolist(), time.perf_counter() - t


def run_system(s: str, model, tok, programs: dict, ids: list[int], n: int) -> tuple[list[int], float, float | None, dict]:
    """One generation: (new tokens, seconds, new tokens per decode step or None for HF, costs).

    ``s`` is ``strategy`` or ``strategy@pipeline`` (``anpd@none``: no passes; ``anpd@default``;
    ``anpd@cache-reuse``: one pass alone)."""
    if s.startswith("hf_"):
        with torch.inference_mode():
            toks, dt = hf_run(model, ids, n, 10 if s == "hf_prompt_lookup" else 0)
        return toks, dt, None, {}
    name, _, passes = s.partition("@")
    passes = passes.replace("+", ",")      # "a+b" in a --strategies item: the pipeline "a,b"
    r = api.generate(model, tok, [ids], strategy=programs[name], max_new_tokens=n, passes=passes or "default")[0]
    st = r.stats
    costs = {"forwards": st.forward_passes, "query_tokens": st.query_tokens, "kv_bytes": st.kv_bytes_copied,
             "accepted": sum(st.accepted_per_step)}
    return r.new_token_ids, st.wall_time_s, st.tokens_per_forward, costs


def first_difference(model, ids: list[int], ref: list[int], got: list[int]) -> str:
    """Where two greedy outputs part, and HF's top-2 logit margin at that step."""
    i = next((j for j, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    with torch.inference_mode():
        logits = model(torch.tensor([ids + ref[:i]])).logits[0, -1]
    top = torch.topk(logits, 2).values
    return f"step {i}: hf={ref[i] if i < len(ref) else 'end'} ours={got[i] if i < len(got) else 'end'} margin={float(top[0] - top[1]):.2e}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", default="greedy,ngram,anpd,jacobi,gs_jacobi,lookahead")
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1, help="repetitions per prompt; the median time counts")
    ap.add_argument("--prompts", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_default_model()
    names = args.strategies.split(",")
    programs = {n.partition("@")[0]: load_strategy(n.partition("@")[0]).program for n in names}
    prompts = load_prompts(args.prompts, args.per_category)
    systems = ["hf_greedy", "hf_prompt_lookup"] + names
    enc = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)["input_ids"]
           for _, q in prompts]
    with torch.inference_mode():   # warm-up
        hf_run(model, enc[0], 8, 0)
        for n in names:
            run_system(n, model, tok, programs, enc[0], 8)
    rows: list[dict] = []
    for i, ((task, _), ids) in enumerate(zip(prompts, enc)):
        res: dict[str, dict] = {}
        for rep in range(args.reps):
            k = (i + rep) % len(systems)
            for s in systems[k:] + systems[:k]:
                toks, dt, tpf, costs = run_system(s, model, tok, programs, ids, args.max_new_tokens)
                prev = res.setdefault(s, {"tokens": toks, "times": [], "tpf": tpf, "costs": costs})
                if toks != prev["tokens"]:
                    raise SystemExit(f"{s} gave different tokens on repetition {rep} of prompt {i}")
                prev["times"].append(dt)
        for r in res.values():
            r["time"] = statistics.median(r["times"])
        ref = res["hf_greedy"]["tokens"]
        for s in systems:
            same = res[s]["tokens"] == ref
            note = "" if same else first_difference(model, ids, ref, res[s]["tokens"])
            rows.append({"task": task, "prompt": i, "system": s, "new_tokens": len(res[s]["tokens"]),
                         "time_s": res[s]["time"], "times_s": res[s]["times"], "tokens_per_forward": res[s]["tpf"], "identical": same, "diff": note,
                         **res[s]["costs"]})
        print(f"[{i + 1}/{len(prompts)}] {task}: " + ", ".join(
            f"{s}={len(res[s]['tokens']) / res[s]['time']:.1f}{'' if res[s]['tokens'] == ref else '!'}" for s in systems),
            file=sys.stderr, flush=True)
    table = summarize(rows, systems)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "strategies.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "rows": rows, "table": table}, indent=1))
    md = markdown(table, systems, args)
    (args.out / "strategies.md").write_text(md)
    print(md)
    return 0


def summarize(rows: list[dict], systems: list[str]) -> dict:
    """Per task and overall: tokens/s (total tokens / total time), speedup vs HF greedy, tpf."""
    out: dict = {}
    for task in TASKS + ["overall"]:
        sel = [r for r in rows if task == "overall" or r["task"] == task]
        if not sel:
            continue
        out[task] = {}
        for s in systems:
            rs = [r for r in sel if r["system"] == s]
            tps = sum(r["new_tokens"] for r in rs) / sum(r["time_s"] for r in rs)
            tpf = [r["tokens_per_forward"] for r in rs if r["tokens_per_forward"] is not None]
            reps = min(len(r["times_s"]) for r in rs)
            per_rep = [sum(r["new_tokens"] for r in rs) / sum(r["times_s"][k] for r in rs) for k in range(reps)]
            out[task][s] = {"tokens_per_s": tps, "tpf": statistics.mean(tpf) if tpf else None,
                            "identical": sum(r["identical"] for r in rs), "n": len(rs),
                            "per_rep_tokens_per_s": per_rep}
            if not s.startswith("hf_"):
                toks = sum(r["new_tokens"] for r in rs) or 1
                out[task][s]["costs"] = {
                    "forwards_per_token": sum(r["forwards"] for r in rs) / toks,
                    "query_tokens_per_token": sum(r["query_tokens"] for r in rs) / toks,
                    "kv_kb_copied_per_token": sum(r["kv_bytes"] for r in rs) / toks / 1024,
                }
        base = out[task]["hf_greedy"]["tokens_per_s"]
        for s in systems:
            out[task][s]["speedup"] = out[task][s]["tokens_per_s"] / base
    if "overall" in out:
        for s in systems:
            out["overall"][s]["mean_task_speedup"] = statistics.mean(out[t][s]["speedup"] for t in TASKS if t in out)
    return out


def markdown(table: dict, systems: list[str], args: argparse.Namespace) -> str:
    head = "| task | " + " | ".join(systems) + " |\n|---|" + "---|" * len(systems) + "\n"
    lines = []
    for task, d in table.items():
        cells = []
        for s in systems:
            c = d[s]
            tpf = f", {c['tpf']:.2f} tok/fwd" if c["tpf"] else ""
            spread = c["per_rep_tokens_per_s"]
            rng = f" [{min(spread):.1f}-{max(spread):.1f}]" if task == "overall" and len(spread) > 1 else ""
            cells.append(f"{c['tokens_per_s']:.1f}{rng} tok/s ({c['speedup']:.2f}x{tpf}) {c['identical']}/{c['n']} same")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    mean = " ".join(f"{s}={table['overall'][s]['mean_task_speedup']:.2f}x" for s in systems) if "overall" in table else ""
    if "overall" in table:
        mean += ("\n\nCosts over all prompts (prefill included), per generated token:\n\n"
                 "| system | forwards | query tokens computed | KV KiB copied | tokens/s | speedup vs HF greedy |\n"
                 "|---|---|---|---|---|---|\n")
        for s in systems:
            c = table["overall"][s]
            if "costs" in c:
                k = c["costs"]
                mean += (f"| {s} | {k['forwards_per_token']:.3f} | {k['query_tokens_per_token']:.2f} | "
                         f"{k['kv_kb_copied_per_token']:.1f} | {c['tokens_per_s']:.1f} | {c['mean_task_speedup']:.2f}x mean per task |\n")
    return (f"Spec-Bench, {args.per_category} questions per task, {args.max_new_tokens} new tokens, "
            f"{args.threads} threads, fp32, median of {args.reps} run(s) per prompt"
            f"{' (overall: [slowest-fastest repetition])' if args.reps > 1 else ''}.\n\n" + head + "\n".join(lines) + f"\n\nMean per-task speedup: {mean}\n")


if __name__ == "__main__":
    raise SystemExit(main())
