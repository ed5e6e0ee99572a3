"""Fast-dLLM's table on the block-diffusion SmolLM2-135M (``decograph adapt-diffusion``'s model).

Held-out chat prompts: the shipped Spec-Bench questions (``decograph.bench``; the adaptation
trained on the other Spec-Bench questions' answers), first turn, chat template, at most
``--max-prompt`` tokens, ``--per-category`` of each task. For each generation length L in
``--lengths`` and each system, batch 1, EOS honored:

- ``AR greedy (HF generate)``: the base causal model, Hugging Face greedy ``generate`` (the
  reference the quality measures compare with);
- ``baseline``: ``llada_semi_ar``: blocks of ``--block``, one token per step, the whole canvas
  recomputed every step (Fast-dLLM's baseline);
- ``+parallel``: ``fast_dllm`` at ``--threshold``, kv=recompute;
- ``+prefix cache`` / ``+dual cache``: the same with the block-wise caches (exact for this
  model: its attention is block-causal, so a block never reads the blocks after it);
- ``left to right, one a step (dual cache)``: ``lud`` at threshold 1.0 (the first masked
  position each step): the diffusion model decoding in the causal model's order;
- ``lud T (dual cache)``: lexical-unit decoding (the run of confident positions from the first
  masked one), and ``+dual cache, threshold T``, for ``--threshold`` and ``--more-thresholds``.

Reported per system: tokens/s (generated tokens / wall time, median over ``--reps``; one run
when a run takes over 20 s), speedup over the baseline, forwards per token, and quality: the
mean log-likelihood per token of the output under the base causal model (``ar_loglik``), and
its agreement with the AR greedy output: the share of positions, over the longer of the two,
holding the same token, and difflib's similarity ratio of the two token sequences (robust to an
early insertion). Systems run interleaved per prompt after a warm-up.

    python benchmarks/bench_block_diffusion.py [--model smollm2-135m-bd] [--per-category 2] [--lengths 64 256]
        [--backend onnxruntime]
"""
from __future__ import annotations

import argparse
import difflib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.api import generate, resolve_model  # noqa: E402
from decograph.bench.prompts import load_prompts  # noqa: E402
from decograph.frontends.strategies import load_strategy  # noqa: E402

AR = "AR greedy (HF generate)"
BASE = "baseline (one token a step)"


def systems(block: int, threshold: float, more: list[float]) -> dict[str, object]:
    def s(name: str, **over: object) -> object:
        return load_strategy(name, overrides={"block": block, **over}).program
    out = {
        BASE: s("llada_semi_ar"),
        "+parallel": s("fast_dllm", threshold=threshold, kv="recompute"),
        "+prefix cache": s("fast_dllm", threshold=threshold, kv="block_approx"),
        "+dual cache": s("fast_dllm", threshold=threshold, kv="block_approx_dual"),
        "left to right, one a step (dual cache)": s("lud", threshold=1.0),
        f"lud {threshold:g} (dual cache)": s("lud", threshold=threshold),
    }
    for t in more:
        out[f"+dual cache, threshold {t:g}"] = s("fast_dllm", threshold=t, kv="block_approx_dual")
        out[f"lud {t:g} (dual cache)"] = s("lud", threshold=t)
    return out


def ar_loglik(model: torch.nn.Module, prompt: list[int], out: list[int]) -> float:
    if not out:
        return float("nan")
    ids = torch.tensor([prompt + out])
    with torch.inference_mode():
        lp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1:-1].float(), -1)
    return float(lp.gather(1, torch.tensor(out)[:, None]).mean())


def agreement(out: list[int], ref: list[int]) -> float:
    """Position by position: the share of positions (over the longer) with the same token."""
    n = max(len(out), len(ref))
    return sum(a == b for a, b in zip(out, ref)) / n if n else 1.0


def similarity(out: list[int], ref: list[int]) -> float:
    """difflib's ratio of the token sequences: 2 * matched / total, matches found in order (a
    token inserted early does not unmatch everything after it, as it does position by position)."""
    return difflib.SequenceMatcher(None, out, ref, autojunk=False).ratio() if out or ref else 1.0


def timed(fn, reps: int) -> tuple[object, float]:
    times, res = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
        if times[-1] > 20:
            break
    return res, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-bd", help="a block-diffusion delta directory or packaged name")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--max-prompt", type=int, default=320)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--more-thresholds", type=float, nargs="*", default=[0.7], metavar="T")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch", help="where the diffusion systems run (torch, onnxruntime)")
    ap.add_argument("--out", default=str(HERE / "results" / "block_diffusion.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapter, tok = resolve_model(args.model)
    base = adapter.model.base
    eos = list(adapter.eos_token_ids)
    prompts = []
    for q in load_prompts(per_category=0):
        ids = tok.apply_chat_template([{"role": "user", "content": q.text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        if len(ids) <= args.max_prompt and sum(p[0] == q.task for p in prompts) < args.per_category:
            prompts.append((q.task, list(ids)))
    print(f"{len(prompts)} prompts: {[t for t, _ in prompts]}", file=sys.stderr)
    progs = systems(args.block, args.threshold, args.more_thresholds)
    rows = []
    for L in args.lengths:
        generate(adapter, tok, [prompts[0][1]], progs["+dual cache"], 8, eos_token_id=eos,
                 backend=args.backend)                                                       # warm-up
        names = [AR, *progs]
        per = {n: {"tps": [], "fwd": [], "tok": [], "ll": [], "agree": [], "sim": []} for n in names}
        for i, (task, p) in enumerate(prompts):
            outs = {}

            def hf() -> list[int]:
                with torch.inference_mode():
                    g = base.generate(torch.tensor([p]), max_new_tokens=L, do_sample=False, eos_token_id=eos,
                                      pad_token_id=eos[0])
                return g[0, len(p):].tolist()
            out, sec = timed(hf, args.reps)
            outs[AR] = out
            per[AR]["tps"].append(len(out) / sec)
            per[AR]["fwd"].append(len(out))
            per[AR]["tok"].append(len(out))
            for name, prog in progs.items():
                (r,), sec = timed(lambda: generate(adapter, tok, [p], prog, L, eos_token_id=eos,
                                                   backend=args.backend), args.reps)
                outs[name] = r.new_token_ids
                per[name]["tps"].append(len(r.new_token_ids) / sec)
                per[name]["fwd"].append(r.stats.forward_passes)
                per[name]["tok"].append(len(r.new_token_ids))
            for name, o in outs.items():                  # scored after every system ran (not timed)
                per[name]["ll"].append(ar_loglik(base, p, o))
                per[name]["agree"].append(agreement(o, outs[AR]))
                per[name]["sim"].append(similarity(o, outs[AR]))
            print(f"L={L} prompt {i + 1}/{len(prompts)} ({task}): " + ", ".join(
                f"{n} {per[n]['tps'][-1]:.1f} tok/s {100 * per[n]['agree'][-1]:.0f}%" for n in names), file=sys.stderr)
        base_tps = statistics.mean(per[BASE]["tps"])
        for name in names:
            m = per[name]
            tps = statistics.mean(m["tps"])
            rows.append({"length": L, "system": name, "tokens_per_s": round(tps, 2), "speedup": round(tps / base_tps, 2),
                         "forwards_per_token": round(sum(m["fwd"]) / max(1, sum(m["tok"])), 3),
                         "tokens": sum(m["tok"]),
                         "ar_loglik_per_token": round(statistics.mean(m["ll"]), 3),
                         "agreement_with_ar_greedy_pct": round(100 * statistics.mean(m["agree"]), 1),
                         "similarity_to_ar_greedy_pct": round(100 * statistics.mean(m["sim"]), 1)})
    print("| gen length | system | tokens/s | speedup vs baseline | forwards/token | AR log-likelihood / token "
          "| same as AR greedy (by position) | similarity to AR greedy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['system']} | {r['tokens_per_s']} | {r['speedup']}x | {r['forwards_per_token']} "
              f"| {r['ar_loglik_per_token']} | {r['agreement_with_ar_greedy_pct']}% | {r['similarity_to_ar_greedy_pct']}% |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "model": adapter.name,
                                          "prompts": [t for t, _ in prompts], "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
