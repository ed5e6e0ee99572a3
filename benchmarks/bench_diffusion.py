"""Fast-dLLM's table on decograph's own masked diffusion LM, in one process.

Infilling on held-out standard-library text (files ``train-mdm`` never trained on): each
case is a held-out passage cut into ``--prompt-len`` tokens before, a span of ``L`` tokens
(masked: the reference), and ``--suffix-len`` tokens after; the model fills the span. The
default model's tokens are bytes and whitespace runs (1.27 bytes a token; 128 tokens: about
four lines of code).
For each generation length L in ``--lengths`` and each system:

- ``baseline``: LLaDA semi-autoregressive decoding (``llada_semi_ar``: blocks of 32, one
  token per step, the whole canvas recomputed every step);
- ``+parallel``: Fast-dLLM's confidence-threshold unmasking (``fast_dllm``, kv=recompute);
- ``+prefix cache``: the same with the block-wise approximate prefix cache (kv=block_approx);
- ``+dual cache``: with the dual cache (kv=block_approx_dual): Fast-dLLM as a whole;
- ``+dual cache, blocks of B/2``: the same with half-size blocks (``--small-block``): a cached
  step runs fewer positions, the cache is refreshed twice as often;
- ``lud (dual cache)``: lexical-unit decoding, contiguous runs, dual cache;
- ``+dual cache, threshold T``: the dual cache at each of ``--more-thresholds`` (the
  threshold's speed / quality trade-off in the same run).

Reported: throughput (generated tokens / wall time, batch 1, median over ``--reps``), speedup
over the baseline, forwards per token, and quality: the token accuracy of the output against
the reference continuation (%), and the accuracy of the baseline's own output taken as the
reference (agreement, %), beside the accuracy of a fill with no model (the passage's context's
most frequent token repeated) and each system's most frequent output token's share (100%:
one token repeated), which show a degenerate fill for what it is, and the model's own
log-likelihood of each output, per token, read left to right (``own_loglik``; the held-out
text's own beside it): what a decoding rule that commits tokens together instead of one at a
time can lose, whether or not the model is good at the task. Systems run interleaved per
case after a warm-up; the likelihoods are scored afterwards, untimed. The model is
``train-mdm``'s default (the LLaDA objective, then self-distillation on its own fills);
``--no-distill``: the one trained with the LLaDA objective alone.

    python benchmarks/bench_diffusion.py [--n 16] [--lengths 64 256] [--reps 3] [--threshold 0.9] [--more-thresholds 0.7 0.5] [--prompt-len 128]
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
from decograph.frontends.strategies import load_strategy  # noqa: E402
from decograph.apps.train_mdm import TrainConfig, held_out_samples, load_trained_mdm, trained_mdm_dir  # noqa: E402


def systems(threshold: float, block: int, small: int, more: list[float]) -> dict[str, object]:
    out = {
        "baseline (LLaDA)": load_strategy("llada_semi_ar", overrides={"block": block}).program,
        "+parallel": load_strategy("fast_dllm", overrides={"block": block, "threshold": threshold, "kv": "recompute"}).program,
        "+prefix cache": load_strategy("fast_dllm", overrides={"block": block, "threshold": threshold, "kv": "block_approx"}).program,
        "+dual cache": load_strategy("fast_dllm", overrides={"block": block, "threshold": threshold, "kv": "block_approx_dual"}).program,
        "lud (dual cache)": load_strategy("lud", overrides={"block": block, "threshold": threshold}).program,
    }
    if small:
        out[f"+dual cache, blocks of {small}"] = load_strategy(
            "fast_dllm", overrides={"block": small, "threshold": threshold, "kv": "block_approx_dual"}).program
    for t in more:                       # the threshold's trade-off: the dual cache at other thresholds
        out[f"+dual cache, threshold {t:g}"] = load_strategy(
            "fast_dllm", overrides={"block": block, "threshold": t, "kv": "block_approx_dual"}).program
    return out


def top_share(out: list[int]) -> float:
    """The share of ``out`` taken by its most frequent token (1.0: one token repeated)."""
    return max(map(out.count, set(out))) / len(out) if out else 0.0


def cell(v: object, unit: str = "") -> str:
    """A table cell: ``-`` for a value a row does not have."""
    return "-" if v is None else f"{v}{unit}"


def accuracy(out: list[int], ref: list[int]) -> float:
    return sum(a == b for a, b in zip(out, ref)) / len(ref)


@torch.no_grad()
def own_loglik(model: torch.nn.Module, prompt: list[int], fill: list[int], suffix: list[int], chunk: int = 32) -> float:
    """The model's own log-likelihood of ``fill`` between ``prompt`` and ``suffix``, per token
    (nats), read left to right: the sum over i of log p(fill[i] | prompt, fill[:i], masks,
    suffix), the chain rule in one order of the any-order model a masked diffusion LM is. One
    canvas per position, ``chunk`` canvases per forward, logits only where they are read."""
    if not fill:
        return 0.0
    mask, n, L = model.config.mask_token_id, len(prompt), len(fill)
    total = 0.0
    for lo in range(0, L, chunk):
        rows = range(lo, min(L, lo + chunk))
        ids = torch.tensor([prompt + fill[:i] + [mask] * (L - i) + suffix for i in rows])
        pos = torch.arange(ids.shape[1]).expand(len(rows), -1)
        at = torch.tensor([[n + i] for i in rows])
        logp = model(ids, pos, logits_at=at)[0][:, 0].float().log_softmax(-1)
        total += float(logp[torch.arange(len(rows)), torch.tensor([fill[i] for i in rows])].sum())
    return total / L


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=16, help="held-out prompts per length")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--suffix-len", type=int, default=32)
    ap.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--more-thresholds", type=float, nargs="*", default=[], metavar="T",
                    help="extra dual-cache rows at these thresholds")
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--small-block", type=int, default=16, help="the extra dual-cache row's block size (0: none)")
    ap.add_argument("--backend", default="torch", help="where every system runs (torch, onnxruntime)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-distill", action="store_true",
                    help="run on the checkpoint trained with the LLaDA objective alone (train-mdm --distill-minutes 0)")
    ap.add_argument("--out", default=str(HERE / "results" / "diffusion.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = TrainConfig(distill_minutes=0) if args.no_distill else TrainConfig()
    model, tok = load_trained_mdm(config)
    info = json.loads((trained_mdm_dir(config) / "train.json").read_text())
    print(f"model: {trained_mdm_dir(config)} ({info['steps']} steps, {info['seconds']:.0f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)", file=sys.stderr)
    progs = systems(args.threshold, args.block, args.small_block, args.more_thresholds)
    rows = []
    for L in args.lengths:
        cases = held_out_samples(tok, args.prompt_len, L + args.suffix_len, args.n, seed=L)
        samples = [(p, c[:L], c[L:]) for p, c in cases]
        run = dict(passes="none", eos_token_id=[], backend=args.backend)   # infilling: the whole span is filled
        generate(model, tok, [samples[0][0]], progs["+dual cache"], L, suffixes=[samples[0][2]], **run)  # warm-up
        per: dict[str, dict[str, list[float]]] = {name: {"tps": [], "acc": [], "agree": [], "fwd": [], "tok": [], "top": [], "ll": []} for name in progs}
        trivial: list[float] = []      # no model: the span filled with the context's most frequent token
        ref_ll: list[float] = []       # the model's own likelihood of the held-out text
        for i, (prompt, ref, suffix) in enumerate(samples):
            outs = {}
            for name, prog in progs.items():
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    [r] = generate(model, tok, [prompt], prog, L, suffixes=[suffix], **run)
                    times.append(time.perf_counter() - t0)
                outs[name] = r
                per[name]["tps"].append(len(r.new_token_ids) / statistics.median(times))
                per[name]["acc"].append(accuracy(r.new_token_ids, ref))
                per[name]["top"].append(top_share(r.new_token_ids))
                per[name]["fwd"].append(r.stats.forward_passes)
                per[name]["tok"].append(len(r.new_token_ids))
            ctx = prompt + suffix
            trivial.append(accuracy([max(set(ctx), key=ctx.count)] * L, ref))
            ref_ll.append(own_loglik(model, prompt, ref, suffix))
            for name, r in outs.items():         # scored after every system ran (not timed)
                per[name]["ll"].append(own_loglik(model, prompt, r.new_token_ids, suffix))
            base = outs["baseline (LLaDA)"].new_token_ids
            for name, r in outs.items():
                per[name]["agree"].append(accuracy(r.new_token_ids, base + [-1] * (L - len(base))) if base else 1.0)
            print(f"L={L} prompt {i + 1}/{len(samples)}: " + ", ".join(
                f"{n} {per[n]['tps'][-1]:.0f} tok/s" for n in progs), file=sys.stderr)
        base_tps = statistics.mean(per["baseline (LLaDA)"]["tps"])
        for name, m in per.items():
            tps = statistics.mean(m["tps"])
            rows.append({"length": L, "system": name, "tokens_per_s": round(tps, 1),
                         "speedup": round(tps / base_tps, 2),
                         "forwards_per_token": round(sum(m["fwd"]) / max(1, sum(m["tok"])), 3),
                         "accuracy_pct": round(100 * statistics.mean(m["acc"]), 2),
                         "agreement_with_baseline_pct": round(100 * statistics.mean(m["agree"]), 2),
                         "top_token_share_pct": round(100 * statistics.mean(m["top"]), 2),
                         "own_loglik_per_token": round(statistics.mean(m["ll"]), 3)})
        rows.append({"length": L, "system": "no model: the context's most frequent token", "tokens_per_s": None,
                     "speedup": None, "forwards_per_token": 0.0, "accuracy_pct": round(100 * statistics.mean(trivial), 2),
                     "agreement_with_baseline_pct": None, "top_token_share_pct": 100.0, "own_loglik_per_token": None})
        rows.append({"length": L, "system": "the held-out text itself", "tokens_per_s": None, "speedup": None,
                     "forwards_per_token": None, "accuracy_pct": 100.0, "agreement_with_baseline_pct": None,
                     "top_token_share_pct": None, "own_loglik_per_token": round(statistics.mean(ref_ll), 3)})
    print("| gen length | system | tokens/s | speedup | forwards/token | token accuracy vs reference | same as baseline "
          "| most frequent token's share | model's own log-likelihood / token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']} | {r['system']} | {cell(r['tokens_per_s'])} | {cell(r['speedup'], 'x')} "
              f"| {cell(r['forwards_per_token'])} | {r['accuracy_pct']}% | {cell(r['agreement_with_baseline_pct'], '%')} "
              f"| {cell(r['top_token_share_pct'], '%')} | {cell(r['own_loglik_per_token'])} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    train = {k: info[k] for k in ("steps", "seconds", "final_loss")}
    if info.get("distill"):
        train["distill"] = {k: v for k, v in info["distill"].items() if k != "curve"}
    Path(args.out).write_text(json.dumps({"args": vars(args), "train": train,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
