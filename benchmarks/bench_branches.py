"""Parallel branches against sequential decoding of the same outputs, in one process.

For each NER input (PaDeLLM-NER, labels PER,ORG,LOC) and each reasoning prompt (the
``parallel_reasoning`` strategy, >= 3 listed steps), the latency of:

- ``parallel``: the fork strategy with the default pipeline (branches packed into one
  sequence, one forward per step for all of them);
- ``unfused``: the same program without passes (one forward per branch per step: sequential
  decoding that shares the prefix's KV);
- ``sequential``: every branch decoded alone, one after another, by decograph greedy (the
  same kernels; the prefix prefilled per branch, as a plain generate call does), then, for
  reasoning, the greedy continuation of the joined text;
- ``hf``: the same sequential decoding with Hugging Face ``generate`` (``--hf``).

Every branch's tokens are checked equal across the systems. Medians over ``--reps``.

    python benchmarks/bench_branches.py [--ner 30] [--reasoning 20] [--reps 3] [--hf]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.api import generate  # noqa: E402
from decograph.models.default import load_default_model  # noqa: E402
from decograph.apps.ner import NerTemplate, extract_entities, ner_request, newline_ids  # noqa: E402

LABELS = ["PER", "ORG", "LOC"]
BRANCH_TOKENS, CONCLUSION = 48, 24     # per branch; conclusion steps
DELIMITER = r"\s*\d+[.)]\s"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _hf(model, ids, n, ends):
    with torch.inference_mode():
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             eos_token_id=ends, pad_token_id=ends[0])
    return out[0, len(ids):].tolist()


def ner_case(model, tok, text, hf: bool) -> dict:
    t = NerTemplate()
    stops = list(newline_ids(tok))
    ends = [model.generation_config.eos_token_id] + stops
    par_s, (_, [res]) = _timed(lambda: extract_entities([text], LABELS, model, tok, t, details=True))
    unf_s, (_, [unf]) = _timed(lambda: extract_entities([text], LABELS, model, tok, t, passes="none", details=True))
    [prompt], _ = ner_request([text], LABELS, tok, t)
    counts, mentions = res.branches
    branches = [(c, t.count_tokens) for c in counts] + [(m, t.mention_tokens) for m in mentions.branches]

    def sequential():
        return [generate(model, tok, [prompt + list(b.prompt_ids)], "greedy", n, stop_token_ids=stops,
                         passes="none")[0].new_token_ids for b, n in branches]

    seq_s, seq = _timed(sequential)
    same = seq == [list(b.tokens) for b, _ in branches]
    same &= [list(b.tokens) for b in unf.branches[1].branches] == [list(b.tokens) for b in mentions.branches]
    row = {"kind": "ner", "branches": len(branches), "tokens": sum(len(b.tokens) for b, _ in branches),
           "parallel_s": par_s, "unfused_s": unf_s, "sequential_s": seq_s,
           "forwards_parallel": res.stats.forward_passes, "forwards_unfused": unf.stats.forward_passes,
           "entities": len(mentions.entities)}
    if hf:
        hf_s, hf_out = _timed(lambda: [_hf(model, prompt + list(b.prompt_ids), n, ends) for b, n in branches])
        same &= hf_out == seq
        row["hf_s"] = hf_s
    row["identical"] = bool(same)
    return row


def reasoning_case(model, tok, q, hf: bool) -> dict:
    eos = model.generation_config.eos_token_id
    over = {"branch_tokens": BRANCH_TOKENS, "conclusion_steps": CONCLUSION, "delimiter": DELIMITER}
    run = lambda passes: generate(model, tok, [q], "parallel_reasoning", 1000, chat=True, overrides=over,  # noqa: E731
                                  passes=passes)[0]
    par_s, res = _timed(lambda: run("default"))
    unf_s, unf = _timed(lambda: run("none"))
    [branches] = res.branches
    prompt = res.prompt_ids

    def sequential(step):
        outs, joined = [], []
        for b in branches:
            out = step(prompt + list(b.prompt_ids), BRANCH_TOKENS)
            outs.append(out)
            joined += list(b.prompt_ids) + (out[:-1] if out[-1:] == [eos] else out)
        # the same conclusion: CONCLUSION steps, which ANPD drafts may make more tokens
        return outs, joined + step(prompt + joined, max(1, len(res.new_token_ids) - len(joined)))

    ours = lambda ids, n: generate(model, tok, [ids], "greedy", n, passes="none")[0].new_token_ids  # noqa: E731
    seq_s, (outs, text) = _timed(lambda: sequential(ours))
    same = outs == [list(b.tokens) for b in branches] and text == res.new_token_ids == unf.new_token_ids
    row = {"kind": "reasoning", "branches": len(branches), "tokens": len(res.new_token_ids),
           "branch_tokens": sum(len(b.tokens) for b in branches),
           "parallel_s": par_s, "unfused_s": unf_s, "sequential_s": seq_s,
           "forwards_parallel": res.stats.forward_passes, "forwards_unfused": unf.stats.forward_passes}
    if hf:
        hf_s, (hf_outs, hf_text) = _timed(lambda: sequential(lambda ids, n: _hf(model, ids, n, [eos])))
        same &= hf_outs == outs and hf_text == text
        row["hf_s"] = hf_s
    row["identical"] = bool(same)
    return row


def _median_rows(runs: list[list[dict]]) -> list[dict]:
    out = []
    for rows in zip(*runs):
        merged = dict(rows[0])
        for key in ("parallel_s", "unfused_s", "sequential_s", "hf_s"):
            if key in merged:
                merged[key] = statistics.median(r[key] for r in rows)
        merged["identical"] = all(r["identical"] for r in rows)
        out.append(merged)
    return out


def _summary(rows: list[dict], kind: str) -> dict:
    rs = [r for r in rows if r["kind"] == kind]
    if not rs:
        return {}
    s = {"inputs": len(rs), "branches_mean": statistics.mean(r["branches"] for r in rs),
         "identical": sum(r["identical"] for r in rs)}
    for key in ("parallel_s", "unfused_s", "sequential_s", "hf_s"):
        if key in rs[0]:
            s[key.replace("_s", "_ms_mean")] = 1000 * statistics.mean(r[key] for r in rs)
    for base in ("sequential_s", "unfused_s", "hf_s"):
        if base in rs[0]:
            ratios = [r[base] / r["parallel_s"] for r in rs]
            s["speedup_vs_" + base[:-2]] = statistics.mean(ratios)
            s["speedup_vs_" + base[:-2] + "_min"] = min(ratios)
    s["forwards_parallel_mean"] = statistics.mean(r["forwards_parallel"] for r in rs)
    s["forwards_unfused_mean"] = statistics.mean(r["forwards_unfused"] for r in rs)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ner", type=int, default=30)
    ap.add_argument("--reasoning", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time Hugging Face generate, sequential")
    ap.add_argument("--out", default=str(HERE / "results" / "branches.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_default_model(progress=False)
    texts = [json.loads(x)["text"] for x in (HERE / "data" / "ner_texts.jsonl").read_text().splitlines()][: args.ner]
    qs = [json.loads(x)["prompt"] for x in (HERE / "data" / "reasoning_prompts.jsonl").read_text().splitlines()]
    qs = qs[: args.reasoning]
    extract_entities(["Ada Lovelace lived in London."], LABELS, model, tok)   # warm up: kernels, cost curve
    runs = []
    for rep in range(args.reps):
        rows = []
        for i, text in enumerate(texts):
            rows.append(ner_case(model, tok, text, args.hf))
            print(f"rep {rep} ner {i}: {rows[-1]}", file=sys.stderr)
        for i, q in enumerate(qs):
            rows.append(reasoning_case(model, tok, q, args.hf))
            print(f"rep {rep} reasoning {i}: {rows[-1]}", file=sys.stderr)
        runs.append(rows)
    rows = _median_rows(runs)
    summary = {"ner": _summary(rows, "ner"), "reasoning": _summary(rows, "reasoning"), "reps": args.reps,
               "labels": LABELS, "branch_tokens": BRANCH_TOKENS, "conclusion_tokens": CONCLUSION}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
