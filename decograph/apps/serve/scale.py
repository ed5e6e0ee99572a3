"""Scale-out on Ray: the same server as a Ray Serve deployment (N replicas, one decoder each,
Ray's HTTP proxy in front), and the prompt-file batch job sharded over Ray Data workers.

Ray is an optional extra (``pip install 'decograph[ray]'``); without it, ``--ray`` is a clear
error. Without ``--ray`` the batch job runs in this process, through the same scheduler.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from decograph.errors import InputError

__all__ = ["serve_on_ray", "run_prompt_file", "read_prompt_file", "need_ray"]


def need_ray(what: str) -> Any:
    try:
        import ray
    except ImportError:
        raise InputError(f"{what} needs Ray, which is not installed: pip install 'decograph[ray]' "
                         "(or run without --ray: one process)") from None
    return ray


def _connect(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    except ConnectionError as e:
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {e}") from None


# ----------------------------------------------------------------------------- the server


def build_app(options: dict[str, Any]) -> Any:
    """The replica's ASGI app: its own decoder and scheduler (called on the replica)."""
    from decograph.apps.serve.app import create_app
    from decograph.apps.serve.models import load_served

    served = load_served(**options["model"])
    return create_app(served, max_batch=options["max_batch"], grace_s=options["grace"],
                      prefill_tokens=options.get("prefill_tokens", 512))


def deployment(options: dict[str, Any], replicas: int) -> Any:
    """The Ray Serve application: ``replicas`` replicas of the decograph app."""
    from ray import serve

    def build_decograph_app() -> Any:       # a plain function: Ray calls it on each replica
        return build_app(options)

    ingress = serve.ingress(build_decograph_app)(type("DecographReplica", (), {}))
    return serve.deployment(name="decograph", num_replicas=replicas,
                            ray_actor_options={"num_cpus": options.get("num_cpus", 1)})(ingress).bind()


def serve_on_ray(address: str | None, replicas: int, options: dict[str, Any], host: str, port: int,
                 ready: threading.Event | None = None, stop: threading.Event | None = None) -> int:
    """Deploy and serve until SIGTERM / Ctrl-C (or ``stop``), then shut the application down."""
    ray = need_ray("decograph serve --ray")
    from ray import serve

    if replicas < 1:
        raise InputError(f"--replicas must be >= 1, got {replicas}")
    _connect(ray, address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(deployment(options, replicas), name="decograph", route_prefix="/")
    print(f"decograph serve: {replicas} replica(s) on Ray, listening on http://{host}:{port}", file=sys.stderr,
          flush=True)
    done = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: done.set())
    if ready is not None:
        ready.set()
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("decograph")
        serve.shutdown()
        print("decograph serve: stopped", file=sys.stderr, flush=True)
    return 0


# ----------------------------------------------------------------------------- the batch job


def read_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a JSONL file: each line ``{"prompt": TEXT}`` or ``{"messages": [...]}``,
    with an optional ``"id"`` (default: the line number) and ``"max_tokens"``. A bad line is an
    ``InputError`` naming the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{p}: cannot read the prompt file: {e}") from None
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{p}:{n}: not JSON: {e.msg}") from None
        if not isinstance(obj, dict) or (("prompt" in obj) == ("messages" in obj)):
            raise InputError(f"{p}:{n}: expected an object with either 'prompt' or 'messages'")
        if "prompt" in obj and not isinstance(obj["prompt"], str):
            raise InputError(f"{p}:{n}: 'prompt' must be a string")
        rid = str(obj.get("id", n))
        if rid in seen:
            raise InputError(f"{p}:{n}: id {rid!r} appears twice")
        seen.add(rid)
        mt = obj.get("max_tokens")
        if mt is not None and (not isinstance(mt, int) or mt < 1):
            raise InputError(f"{p}:{n}: 'max_tokens' must be an integer >= 1")
        out.append({"id": rid, "prompt": obj.get("prompt"), "messages": obj.get("messages"), "max_tokens": mt})
    return out


def _done_ids(out: Path) -> set[str]:
    """Ids already in ``out`` (a resumed job skips them); a torn last line is dropped."""
    if not out.exists():
        return set()
    ids, good = set(), []
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(str(json.loads(line)["id"]))
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue                          # a line cut by a kill: decoded again
    out.write_text("".join(x + "\n" for x in good), encoding="utf-8")
    return ids


class Worker:
    """Decodes batches of prompt records with one decoder and continuous batching (in this
    process, or as a Ray Data actor)."""

    def __init__(self, model: dict[str, Any], max_tokens: int, chat: bool, max_batch: int = 16) -> None:
        from decograph.apps.serve.models import load_served
        from decograph.runtime.scheduler import Scheduler

        self.served = load_served(**model)
        self.max_tokens, self.chat = max_tokens, chat
        self.sched = Scheduler(self.served.interpreter, max_batch=max_batch if self.served.continuous else 1,
                               lane_context=self.served.lane_context())

    def decode(self, records: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        reqs = []
        for r in records:
            try:
                ids = (self.served.chat(r["messages"]) if r.get("messages") else
                       self.served.chat([{"role": "user", "content": r["prompt"]}]) if self.chat and
                       self.served.template else self.served.encode(r["prompt"]))
            except InputError as e:
                raise InputError(f"prompt {r['id']!r}: {e}") from None
            reqs.append((r, self.sched.submit(ids, int(r.get("max_tokens") or self.max_tokens))))
        for r, req in reqs:
            toks = req.result()
            st = req.stats
            yield {"id": r["id"], "text": self.served.decode(toks), "token_ids": toks,
                   "finish_reason": st.finish_reason, "prompt_tokens": st.prompt_tokens, "forwards": st.forwards,
                   "tokens_per_forward": round(st.tokens_per_forward, 4), "accepted_draft_tokens": st.accepted}


def _plain(v: Any) -> Any:
    """A numpy scalar or array from Ray Data back to plain Python."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def run_prompt_file(inp: str | Path, out: str | Path, model: dict[str, Any], *, max_tokens: int = 128,
                    chat: bool = True, ray_address: str | None = None, use_ray: bool = False, workers: int = 2,
                    max_batch: int = 16, progress: bool = True) -> dict[str, Any]:
    """Decode every prompt of ``inp`` not yet in ``out``, appending one JSON line per prompt to
    ``out`` as it finishes (resumable: a rerun skips the ids already there). With ``use_ray``,
    the prompts are sharded over ``workers`` Ray Data actors (one decoder each)."""
    from tqdm import tqdm

    records = read_prompt_file(inp)
    dst = Path(out)
    if dst.exists() and dst.is_dir():
        raise InputError(f"{dst}: is a directory; --out takes a JSONL file")
    dst.parent.mkdir(parents=True, exist_ok=True)
    done = _done_ids(dst)
    todo = [r for r in records if r["id"] not in done]
    bar = tqdm(total=len(records), initial=len(records) - len(todo), unit="prompt", disable=not progress,
               file=sys.stderr, desc="decoding")
    t0 = time.perf_counter()
    written = 0
    with dst.open("a", encoding="utf-8") as f:
        def write(row: dict[str, Any]) -> None:
            nonlocal written
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            written += 1
            bar.update(1)

        if not todo:
            pass
        elif use_ray:
            ray = need_ray("decograph run --ray")
            _connect(ray, ray_address)
            import ray.data

            items = [{"id": r["id"], "prompt": r["prompt"] or "", "messages": json.dumps(r["messages"] or []),
                      "max_tokens": r["max_tokens"] or 0} for r in todo]
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), workers * 4)))
            ds = ds.map_batches(_RayWorker, fn_constructor_args=(model, max_tokens, chat, max_batch),
                                batch_size=max(1, min(max_batch, -(-len(items) // workers))),
                                concurrency=workers, num_cpus=1)
            for row in ds.iter_rows():
                write({k: _plain(v) for k, v in row.items()})
        else:
            worker = Worker(model, max_tokens, chat, max_batch)
            for row in worker.decode(todo):
                write(row)
            worker.sched.close(5)
    bar.close()
    return {"prompts": len(records), "skipped": len(records) - len(todo), "written": written,
            "seconds": round(time.perf_counter() - t0, 2)}


class _RayWorker(Worker):
    """The Ray Data actor: records come as columns (messages JSON-encoded: Arrow wants one type
    per column)."""

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["id"])
        records = []
        for i in range(n):
            msgs = json.loads(str(batch["messages"][i]))
            records.append({"id": str(batch["id"][i]), "prompt": str(batch["prompt"][i]) or None,
                            "messages": msgs or None, "max_tokens": int(batch["max_tokens"][i]) or None})
        rows = list(self.decode(records))
        return {k: [row[k] for row in rows] for k in rows[0]} if rows else {}
