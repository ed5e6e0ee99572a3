"""The diffusion models' text, scored beside the causal model's own, on code prefixes.

decograph ships two masked-diffusion models: the 3.5M-parameter MDM of ``decograph train-mdm``
(its own 4096-token vocabulary, trained on the Python standard library) and the block-diffusion
SmolLM2-135M of ``decograph adapt-diffusion`` (``smollm2-135m-bd``). Both continue the same
code prefixes (``benchmarks/data/code_completion.jsonl``, raw text: the MDM has no chat
template) for ``--max-new-tokens`` of their own tokens; so does the causal SmolLM2-135M with
Hugging Face greedy ``generate``. Every output is scored as text, so models with different
vocabularies compare:

- ``ar_loglik``: the mean log-likelihood per token under the causal SmolLM2-135M of the output
  text (encoded by its tokenizer) after the prefix;
- ``similarity``: difflib's ratio of the output's characters to the causal model's greedy text;
- ``top_word_share``: the share of the output's most frequent word (a fill of one repeated
  word scores near 1).

    decograph train-mdm        # first, if its checkpoint is not cached (about 28 minutes)
    python benchmarks/score_diffusion_text.py [--max-new-tokens 64]
"""
from __future__ import annotations

import argparse
import collections
import difflib
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from decograph.api import generate, resolve_model  # noqa: E402
from decograph.apps.train_mdm import trained_mdm_dir  # noqa: E402
from decograph.frontends.strategies import load_strategy  # noqa: E402


def ar_loglik(model, tok, prefix: str, text: str) -> float:
    cont = tok(text, add_special_tokens=False).input_ids
    if not cont:
        return float("nan")
    ids = tok(prefix, add_special_tokens=False).input_ids
    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([ids + cont])).logits[0, len(ids) - 1:-1].float(), -1)
    return float(lp.gather(1, torch.tensor(cont)[:, None]).mean())


def top_word_share(text: str) -> float:
    words = text.split()
    return collections.Counter(words).most_common(1)[0][1] / len(words) if words else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=str(HERE / "results" / "diffusion_text_scores.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    n = args.max_new_tokens
    prefixes = [json.loads(line)["turns"][0] for line in (HERE / "data" / "code_completion.jsonl").read_text().splitlines()]
    ar, ar_tok = resolve_model(None)
    ar_model = ar.model
    bd, bd_tok = resolve_model("smollm2-135m-bd")
    mdm, mdm_tok = resolve_model(str(trained_mdm_dir()))
    bd16 = {"block": 16}
    systems = {
        "AR greedy (SmolLM2-135M, HF generate)": None,
        "135M block diffusion, lud 0.9 (dual cache)": (bd, bd_tok, load_strategy("lud", overrides={**bd16, "threshold": 0.9}).program),
        "135M block diffusion, fast_dllm 0.9 (dual cache)": (bd, bd_tok, load_strategy(
            "fast_dllm", overrides={**bd16, "threshold": 0.9, "kv": "block_approx_dual"}).program),
        "135M block diffusion, llada_semi_ar (one a step)": (bd, bd_tok, load_strategy("llada_semi_ar", overrides=bd16).program),
        "3.5M MDM, fast_dllm (default)": (mdm, mdm_tok, load_strategy("fast_dllm").program),
        "3.5M MDM, llada_semi_ar (one a step)": (mdm, mdm_tok, load_strategy("llada_semi_ar").program),
    }
    texts: dict[str, list[str]] = {name: [] for name in systems}
    for prefix in prefixes:
        for name, sys_ in systems.items():
            if sys_ is None:
                ids = ar_tok(prefix, add_special_tokens=False).input_ids
                with torch.inference_mode():
                    out = ar_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                            pad_token_id=ar_tok.eos_token_id)[0, len(ids):].tolist()
                texts[name].append(ar_tok.decode(out, skip_special_tokens=True))
                continue
            model, tok, program = sys_
            ids = tok(prefix, add_special_tokens=False).input_ids if callable(tok) else tok.encode(prefix)
            [res] = generate(model, tok, [list(ids)], program, n)
            texts[name].append(tok.decode(res.new_token_ids, skip_special_tokens=True))
        print(f"prefix {len(texts[next(iter(systems))])}/{len(prefixes)} done", file=sys.stderr)
    ref = texts["AR greedy (SmolLM2-135M, HF generate)"]
    rows = []
    for name, outs in texts.items():
        rows.append({"system": name,
                     "ar_loglik_per_token": round(statistics.mean(ar_loglik(ar_model, ar_tok, p, t)
                                                                  for p, t in zip(prefixes, outs)), 3),
                     "similarity_to_ar_greedy_pct": round(100 * statistics.mean(
                         difflib.SequenceMatcher(None, t, r, autojunk=False).ratio() for t, r in zip(outs, ref)), 1),
                     "top_word_share_pct": round(100 * statistics.mean(map(top_word_share, outs)), 1),
                     "mean_chars": round(statistics.mean(map(len, outs)), 1),
                     "samples": outs[:2]})
    print("| system | AR log-likelihood / token | similarity to AR greedy | most frequent word | chars |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['ar_loglik_per_token']} | {r['similarity_to_ar_greedy_pct']}% "
              f"| {r['top_word_share_pct']}% | {r['mean_chars']} |")
    Path(args.out).write_text(json.dumps({"max_new_tokens": n, "prefixes": len(prefixes), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
