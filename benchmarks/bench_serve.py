"""``decograph serve`` under load: Spec-Bench chat prompts sent at several concurrencies to the
real server (a subprocess on a loopback port) serving the exported int4 decoder, once with
greedy decoding and once with its anpd program; and a soak run.

Per (strategy, concurrency): throughput (completion tokens over the wall time of the whole
load), time to first token and per-token latency after it (p50, p99 over requests), tokens
per forward, and whether each output equals the greedy server's for the same prompt (lossless:
it must). The load generator is httpx (async, streamed; ``stream_options.include_usage``).

    python benchmarks/bench_serve.py [--per-category 2] [--concurrency 1 4 16] [--max-tokens 128]
        [--exported DIR] [--out benchmarks/results/serve.json]
    python benchmarks/bench_serve.py --soak 500 --concurrency 16 --max-tokens 16

``--soak N``: N requests, ``--concurrency`` at a time, against one server (anpd): errors, and
the server's resident memory after the 50th request and after the last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def questions(per_category: int) -> list[str]:
    by: dict[str, list[str]] = {}
    for line in (HERE / "data" / "spec_bench_questions.jsonl").read_text().splitlines():
        q = json.loads(line)
        by.setdefault(q["category"], []).append(q["turns"][0])
    return [q for qs in by.values() for q in qs[:per_category]]


class ServerProcess:
    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "decograph", "serve", "--port", "0", *args],
                                     stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url = None
        self.log: list[str] = []
        for line in self.proc.stderr:                       # type: ignore[union-attr]
            self.log.append(line)
            m = re.search(r"Uvicorn running on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            raise RuntimeError("the server did not start:\n" + "".join(self.log)[-3000:])
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"{r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                return {"error": obj["error"]["message"]}
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices", []):
                piece = c.get("delta", {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(piece)
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    return {"text": "".join(text), "tokens": n, "ttft": (first or end) - t0, "total": end - t0,
            "tpot": ((last - first) / (n - 1)) if first and last and n > 1 else None,
            "forwards": usage["decograph"]["decode_forwards"] if usage else 0}


async def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
               progress=None) -> tuple[list[dict], float]:
    sem = asyncio.Semaphore(concurrency)
    done = [0]

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=concurrency + 4)) \
            as client:
        async def task(p: str) -> dict:
            async with sem:
                r = await one(client, url, model, p, max_tokens)
            done[0] += 1
            if progress:
                progress(done[0], r)
            return r

        t0 = time.perf_counter()
        out = await asyncio.gather(*(task(p) for p in prompts))
        return list(out), time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]


def summarize(name: str, c: int, results: list[dict], wall: float, reference: list[str] | None) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    fw = sum(r["forwards"] for r in ok)
    row = {"strategy": name, "concurrency": c, "requests": len(results), "errors": len(results) - len(ok),
           "throughput_tok_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * pct([r["ttft"] for r in ok], 50)),
           "ttft_p99_ms": round(1000 * pct([r["ttft"] for r in ok], 99)),
           "tpot_p50_ms": round(1000 * pct([r["tpot"] for r in ok if r["tpot"]], 50), 1),
           "tpot_p99_ms": round(1000 * pct([r["tpot"] for r in ok if r["tpot"]], 99), 1),
           "tokens_per_forward": round(tokens / fw, 3) if fw else None, "wall_s": round(wall, 1)}
    if reference is not None:
        row["identical_to_greedy"] = f"{sum(r.get('text') == g for r, g in zip(results, reference))}/{len(results)}"
    return row


def export_int4(tmp: Path) -> Path:
    from decograph.export import export_decoder

    print("exporting anpd with int4 weights ...", file=sys.stderr)
    return export_decoder("anpd", tmp / "dec", quant="int4", progress=lambda m: None)


def bench(args: argparse.Namespace, exported: Path) -> list[dict]:
    prompts = questions(args.per_category)
    rows: list[dict] = []
    reference: dict[int, list[str]] = {}
    for name, extra in (("greedy", ["--strategy", "greedy"]), ("anpd", [])):
        srv = ServerProcess(["--exported", str(exported), "--max-batch", str(max(args.concurrency)),
                             "--served-model-name", "m", *extra])
        try:
            asyncio.run(load(srv.url, "m", prompts[:2], 2, 8))          # warm-up (graph, exactness, curve)
            for c in args.concurrency:
                res, wall = asyncio.run(load(srv.url, "m", prompts, c, args.max_tokens))
                if name == "greedy":
                    reference[c] = [r.get("text") for r in res]
                row = summarize(name, c, res, wall, reference.get(c) if name != "greedy" else None)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            srv.stop()
    return rows


def soak(args: argparse.Namespace, exported: Path) -> dict:
    prompts = [q for q in questions(10) if len(q) < 400]       # short prompts: many requests, little prefill
    srv = ServerProcess(["--exported", str(exported), "--max-batch", str(max(args.concurrency)),
                         "--served-model-name", "m"])
    mem: dict[int, float] = {}
    errors: list[str] = []

    def progress(n: int, r: dict) -> None:
        if "error" in r:
            errors.append(r["error"])
        if n in (50, args.soak) or n % 100 == 0:
            mem[n] = srv.rss_mb()
            print(f"soak: {n}/{args.soak} requests, {len(errors)} errors, server RSS {mem[n]:.0f} MB",
                  file=sys.stderr, flush=True)

    try:
        work = [prompts[i % len(prompts)] for i in range(args.soak)]
        res, wall = asyncio.run(load(srv.url, "m", work, max(args.concurrency), args.max_tokens, progress))
        mem[args.soak] = srv.rss_mb()
    finally:
        srv.stop()
    return {"requests": args.soak, "concurrency": max(args.concurrency), "errors": len(errors),
            "first_errors": errors[:3], "rss_mb_after_50": round(mem.get(50, 0.0), 1),
            "rss_mb_after_last": round(mem[args.soak], 1),
            "growth_after_50": round(mem[args.soak] / mem[50] - 1, 4) if mem.get(50) else None,
            "wall_s": round(wall, 1), "tokens": sum(r.get("tokens", 0) for r in res)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-category", type=int, default=2)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--exported", metavar="DIR", help="an exported int4 anpd decoder (default: exported now)")
    ap.add_argument("--soak", type=int, default=0, metavar="N", help="run the soak test of N requests instead")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        exported = Path(args.exported) if args.exported else export_int4(tmp)
        if args.soak:
            result = soak(args, exported)
            print(json.dumps(result, indent=1))
            Path(args.out or HERE / "results" / "serve_soak.json").write_text(json.dumps(result, indent=1))
            return
        rows = bench(args, exported)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("| strategy | concurrency | throughput tok/s | TTFT p50 / p99 ms | per-token p50 / p99 ms | tokens/forward "
          "| identical to greedy | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['concurrency']} | {r['throughput_tok_s']} | {r['ttft_p50_ms']} / "
              f"{r['ttft_p99_ms']} | {r['tpot_p50_ms']} / {r['tpot_p99_ms']} | {r['tokens_per_forward']} | "
              f"{r.get('identical_to_greedy', '-')} | {r['errors']} |")
    Path(args.out or HERE / "results" / "serve.json").write_text(json.dumps({"args": vars(args), "rows": rows},
                                                                            indent=1))


if __name__ == "__main__":
    main()
