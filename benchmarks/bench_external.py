"""External baselines on this machine: onnxruntime-genai (greedy and its n-gram speculation, on
its own int4 export of the default model) and llama-cpp-python (greedy, on the wheel's GGUF).

One prompt per Spec-Bench category (the first question's first turn, chat template applied),
``--max-new-tokens`` new tokens. For each system that is installed: tokens/s (per prompt the
median of ``--reps`` timed runs after one warm-up, systems interleaved per prompt, order
rotated; tokens/s = all new tokens / sum of the medians), the share of ort_genai_ngram outputs
identical to ort_genai_greedy, each system's forward-cost curve (k = 1, 2, 4, 8 query tokens
over one), and how often each system's output equals Hugging Face fp32 greedy (information
only: the systems run int4 / Q4_1 weights). Writes ``benchmarks/results/external.json``.

Thread pools sleep instead of spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``, set here
before torch loads, and ORT's ``allow_spinning=0``), unless ``--spin``: on a shared 2-core
machine spinning collapses llama.cpp to a few tok/s (see decograph/baselines.py).

    python benchmarks/bench_external.py [--max-new-tokens 64] [--reps 3] [--spin]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--spin" not in sys.argv:       # libgomp reads it when loaded: before torch and llama.cpp are
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.baselines import external_systems  # noqa: E402
from decograph.models.default import load_default_model  # noqa: E402

KS = (1, 2, 4, 8)


def prompts(tok) -> list[tuple[str, list[int]]]:
    seen: dict[str, str] = {}
    for line in (HERE / "data" / "spec_bench_questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        seen.setdefault(q["category"], q["turns"][0])
    out = []
    for cat, text in seen.items():
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        out.append((cat, [int(i) for i in (ids["input_ids"] if hasattr(ids, "keys") else ids)]))
    return out


def hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist(), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "external.json"))
    ap.add_argument("--spin", action="store_true", help="leave the thread pools' busy-waiting on")
    args = ap.parse_args()
    torch.set_num_threads(2)
    load_before = os.getloadavg()

    model, tok = load_default_model(progress=False)
    systems, unavailable = external_systems(log=lambda m: print(m, file=sys.stderr, flush=True))
    for name, why in unavailable.items():
        print(f"unavailable: {name}: {why}", file=sys.stderr)
    data = prompts(tok)
    names = list(systems)

    def note(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", file=sys.stderr, flush=True)

    note(f"HF fp32 greedy on {len(data)} prompts")
    hf_out, hf_time = {}, {}
    for cat, ids in data:
        hf_out[cat], hf_time[cat] = hf_greedy(model, ids, args.max_new_tokens)

    for s in systems.values():                       # warm-up: sessions, allocators, caches
        s.generate(data[0][1], 8)
    times: dict[str, dict[str, list[float]]] = {n: {c: [] for c, _ in data} for n in names}
    outs: dict[str, dict[str, list[int]]] = {n: {} for n in names}
    unstable: dict[str, list[str]] = {n: [] for n in names}
    ngram_stats: list[dict] = []
    for rep in range(args.reps):
        note(f"rep {rep + 1}/{args.reps}: {', '.join(names)}")
        for i, (cat, ids) in enumerate(data):
            order = names[(i + rep) % len(names):] + names[:(i + rep) % len(names)] if names else []
            for n in order:
                new, dt = systems[n].generate(ids, args.max_new_tokens)
                times[n][cat].append(dt)
                if cat in outs[n] and outs[n][cat] != new:
                    unstable[n].append(cat)
                outs[n].setdefault(cat, new)
                if n == "ort_genai_ngram" and rep == 0 and systems[n].last_stats:
                    ngram_stats.append({"category": cat, **systems[n].last_stats})

    note("forward-cost curves")
    curves = {}
    for n, s in systems.items():
        if hasattr(s, "forward_cost"):
            curves[n] = {k: round(s.forward_cost(k, ks=KS, reps=9), 3) for k in KS}

    report: dict = {"max_new_tokens": args.max_new_tokens, "reps": args.reps, "prompts": len(data),
                    "categories": [c for c, _ in data], "prompt_tokens": {c: len(i) for c, i in data},
                    "torch_threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp default)"),
                    "ort_spinning": {n: s.spinning for n, s in systems.items() if hasattr(s, "spinning")},
                    "systems": {}, "unavailable": unavailable,
                    "forward_cost": curves}
    hf_tokens = sum(len(v) for v in hf_out.values())
    report["hf_fp32_greedy"] = {"tokens": hf_tokens, "tok_s_single_run": round(hf_tokens / sum(hf_time.values()), 1)}
    for n in names:
        med = {c: statistics.median(v) for c, v in times[n].items()}
        toks = sum(len(outs[n][c]) for c, _ in data)
        report["systems"][n] = {
            "tok_s": round(toks / sum(med.values()), 1),
            "tokens": toks,
            "median_prompt_tok_s": round(statistics.median(len(outs[n][c]) / med[c] for c, _ in data), 1),
            "per_prompt_tok_s": {c: round(len(outs[n][c]) / med[c], 1) for c, _ in data},
            "equal_to_hf_fp32_greedy": sum(outs[n][c] == hf_out[c] for c, _ in data),
            "first_divergence_from_hf": {c: next((j for j, (a, b) in enumerate(zip(outs[n][c], hf_out[c])) if a != b),
                                                 None if len(outs[n][c]) == len(hf_out[c]) else min(len(outs[n][c]), len(hf_out[c])))
                                         for c, _ in data},
            "outputs_differ_across_reps": unstable[n],
        }
    if "ort_genai_greedy" in outs and "ort_genai_ngram" in outs:
        same = [c for c, _ in data if outs["ort_genai_ngram"][c] == outs["ort_genai_greedy"][c]]
        g, s = report["systems"]["ort_genai_greedy"], report["systems"]["ort_genai_ngram"]
        report["ort_genai_ngram_vs_greedy"] = {
            "identical": len(same), "of": len(data), "identical_categories": same,
            "speedup": round(s["tok_s"] / g["tok_s"], 3),
            "acceptance": round(sum(x.get("draft_tokens_accepted", 0) for x in ngram_stats)
                                / max(1, sum(x.get("draft_tokens_proposed", 0) for x in ngram_stats)), 3),
            "config": {"ngram_size": systems["ort_genai_ngram"].ngram_size,
                       "max_draft_tokens": systems["ort_genai_ngram"].max_draft_tokens},
            "stats_rep0": ngram_stats}
    report["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{len(data)} prompts (one per Spec-Bench category), {args.max_new_tokens} new tokens, "
          f"median of {args.reps} interleaved reps; load average {report['load_average']}\n")
    print("| system | tok/s (all tokens / all time) | median per-prompt tok/s | = HF fp32 greedy "
          "| cost k=1 | k=2 | k=4 | k=8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in names:
        r, c = report["systems"][n], curves.get(n, {})
        print(f"| {n} | {r['tok_s']} | {r['median_prompt_tok_s']} | {r['equal_to_hf_fp32_greedy']}/{len(data)} | "
              + " | ".join(str(c.get(k, "-")) for k in KS) + " |")
    print(f"| hf_fp32_greedy (1 run, info) | {report['hf_fp32_greedy']['tok_s_single_run']} | - | - | - | - | - | - |")
    if "ort_genai_ngram_vs_greedy" in report:
        v = report["ort_genai_ngram_vs_greedy"]
        print(f"\nort_genai_ngram vs ort_genai_greedy: {v['speedup']}x, {v['identical']}/{v['of']} outputs identical, "
              f"draft acceptance {v['acceptance']}")
    for n, why in unavailable.items():
        print(f"\n{n}: unavailable: {why}")


if __name__ == "__main__":
    main()
