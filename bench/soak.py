"""Soak: a bounded run of many concurrent clients against a real tpa-serve on loopback (the demo model), then a
check that nothing was lost or leaked.

Each request draws its kind from a seeded generator: chat or text completion, streamed or not, with an image
(a PNG data URL) or not, through the OpenAI SDK or raw httpx; a third disconnect at a random point (mid-stream,
or while waiting for a whole answer); some read their stream slowly. The server gets few seats and a short
waiting queue, so bursts go over the limit and are refused with 503.

It ends by checking: every request is accounted for (completed, aborted by its client's disconnect, or
refused with 503 queue_full; anything else is an error), the server runs no request and waits for none, every
cache block is free (its /metrics), and the server's resident memory is within 10% of where it stood after
a warm-up of the same mix. Prints a table and writes JSON (bench/results/soak.json by default).

    OMP_NUM_THREADS=1 python bench/soak.py --requests 300 --concurrency 48
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo"
SERVER_FLAGS = ["--cache-memory", "0.05", "--log-level", "warning"]


def queue_flags(concurrency: int) -> list[str]:
    """Seats for a quarter of the clients and a waiting queue for half: the rest, in bursts, get 503."""
    return ["--max-num-seqs", str(max(1, concurrency // 4)), "--max-waiting", str(max(1, concurrency // 2))]
OUTCOMES = ("completed", "aborted", "refused", "error")


@dataclass
class Kind:
    endpoint: str  # "chat" or "completion"
    stream: bool
    image: bool
    sdk: bool
    disconnect_after: float | None  # seconds (whole answers) or events (streams) before leaving; None: stay
    slow: bool  # a streaming reader that sleeps between events
    max_tokens: int


@dataclass
class Outcome:
    kind: Kind
    outcome: str
    detail: str
    seconds: float


def draw_kind(rng: random.Random) -> Kind:
    endpoint = "chat" if rng.random() < 0.75 else "completion"
    stream = rng.random() < 0.5
    leaves = rng.random() < 1 / 3
    sdk = not leaves and rng.random() < 0.5  # the SDK reads to the end; leaving is done with raw httpx
    disconnect = None
    if leaves:
        disconnect = float(rng.randint(1, 12)) if stream else rng.uniform(0.02, 1.0)
    return Kind(endpoint=endpoint, stream=stream, image=endpoint == "chat" and rng.random() < 0.3, sdk=sdk,
                disconnect_after=disconnect, slow=stream and not leaves and rng.random() < 0.2,
                max_tokens=rng.randint(4, 48))


def png_data_url(rng: random.Random) -> str:
    from PIL import Image

    buf = io.BytesIO()
    size = (rng.randint(8, 96), rng.randint(8, 96))
    Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256))).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(kind: Kind, rng: random.Random) -> tuple[str, dict]:
    words = " ".join(rng.choice(["cache", "token", "river", "blue", "seven", "why", "the"]) for _ in range(20))
    common = {"model": MODEL, "max_tokens": kind.max_tokens, "temperature": 1.0, "ignore_eos": True,
              "stream": kind.stream, "seed": rng.randrange(1 << 30)}
    if kind.endpoint == "completion":
        return "/v1/completions", {**common, "prompt": words}
    content: str | list = words
    if kind.image:
        content = [{"type": "image_url", "image_url": {"url": png_data_url(rng)}}, {"type": "text", "text": words}]
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": content}]}


# -- one client ------------------------------------------------------------------------------------------------


async def raw_request(client: httpx.AsyncClient, path: str, body: dict, kind: Kind) -> tuple[str, str]:
    if not kind.stream:
        call = client.post(path, json=body)
        if kind.disconnect_after is not None:
            try:
                r = await asyncio.wait_for(call, kind.disconnect_after)
            except asyncio.TimeoutError:
                return "aborted", "left while waiting"
        else:
            r = await call
        return judge_whole(r.status_code, r.text)
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return judge_whole(r.status_code, (await r.aread()).decode())
        events = 0
        async for line in r.aiter_lines():
            if not line:
                continue
            events += 1
            if kind.disconnect_after is not None and events >= kind.disconnect_after:
                return "aborted", f"left after {events} events"
            if kind.slow:
                await asyncio.sleep(0.05)
            if line == "data: [DONE]":
                return "completed", f"{events} events"
            if '"error"' in line and json.loads(line[6:]).get("error"):
                return "error", line[:200]
        return "error", f"stream ended without [DONE] after {events} events"


def judge_whole(status: int, text: str) -> tuple[str, str]:
    if status == 200:
        body = json.loads(text)
        return ("completed", "") if body.get("choices") else ("error", text[:200])
    if status == 503 and '"queue_full"' in text:
        return "refused", "503 queue_full"
    return "error", f"{status} {text[:200]}"


async def sdk_request(client, path: str, body: dict, kind: Kind) -> tuple[str, str]:
    import openai

    create = client.chat.completions.create if kind.endpoint == "chat" else client.completions.create
    args = {k: v for k, v in body.items() if k not in ("ignore_eos",)}
    try:
        result = await create(**args, extra_body={"ignore_eos": True})
        if not kind.stream:
            return ("completed", "") if result.choices else ("error", "no choices")
        chunks = 0
        async for _ in result:
            chunks += 1
        return "completed", f"{chunks} chunks"
    except openai.APIStatusError as e:
        if e.status_code == 503 and (e.body or {}).get("code") == "queue_full":
            return "refused", "503 queue_full (SDK)"
        return "error", f"{e.status_code} {e.body}"


async def one(i: int, kind: Kind, body_rng: random.Random, base_url: str, raw: httpx.AsyncClient, sdk) -> Outcome:
    path, body = request_body(kind, body_rng)
    start = time.perf_counter()
    try:
        if kind.sdk:
            outcome, detail = await sdk_request(sdk, path, body, kind)
        else:
            outcome, detail = await raw_request(raw, path, body, kind)
    except Exception as e:  # noqa: BLE001 - a soak records every failure rather than stopping at the first
        outcome, detail = "error", f"{type(e).__name__}: {e}"
    return Outcome(kind, outcome, detail, time.perf_counter() - start)


async def run_clients(base_url: str, requests: int, concurrency: int, seed: int) -> list[Outcome]:
    """`requests` requests from `concurrency` clients at once; each client sends its next as soon as it is done."""
    import openai

    rng = random.Random(seed)
    kinds = [draw_kind(rng) for _ in range(requests)]
    body_rngs = [random.Random(rng.random()) for _ in range(requests)]
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as raw:
        sdk = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        queue = list(enumerate(kinds))
        outcomes: list[Outcome] = []

        async def client() -> None:
            while queue:
                i, kind = queue.pop(0)
                outcomes.append(await one(i, kind, body_rngs[i], base_url, raw, sdk))
                if outcomes[-1].outcome == "refused":
                    await asyncio.sleep(0.2)  # backs off (Retry-After says 1 s), then sends its next request

        await asyncio.gather(*(client() for _ in range(concurrency)))
        await sdk.close()
    return outcomes


# -- the server ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    code = "import sys\nfrom server.cli import serve_main\nsys.exit(serve_main(sys.argv[1:]))"
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server's logging
    proc = subprocess.Popen([sys.executable, "-c", code, "--model", MODEL, "--port", str(port), *SERVER_FLAGS,
                             *extra], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    deadline = time.time() + 120
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError(f"tpa-serve did not come up:\n{log.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def engine_state(base_url: str) -> dict[str, float]:
    """Running and waiting sequences and used cache blocks (all pools), from /metrics."""
    text = httpx.get(base_url + "/metrics").text
    value = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))  # noqa: E731
    blocks = sum(float(v) for v in re.findall(r"^gemma_tpa_cache_blocks_used\{[^}]*\} (\S+)$", text, re.M))
    return {"running": value("gemma_tpa_requests_running"), "waiting": value("gemma_tpa_requests_waiting"),
            "blocks_used": blocks}


def wait_idle(base_url: str, timeout: float = 30) -> dict[str, float]:
    deadline = time.time() + timeout
    while True:
        state = engine_state(base_url)
        if not any(state.values()) or time.time() > deadline:
            return state
        time.sleep(0.1)


# -- the run ---------------------------------------------------------------------------------------------------


def soak(requests: int, concurrency: int, seed: int = 0, warmup: int = 60, extra_flags: list[str] = ()) -> dict:
    """Warm up with the same mix, settle, measure RSS; run; settle; check. Returns the result (see `checks`)."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    flags = [*queue_flags(concurrency), *extra_flags]
    proc = start_server(port, flags)
    try:
        asyncio.run(run_clients(base_url, warmup, concurrency, seed + 1000))
        wait_idle(base_url)
        rss_before = rss_mib(proc.pid)
        start = time.perf_counter()
        outcomes = asyncio.run(run_clients(base_url, requests, concurrency, seed))
        seconds = time.perf_counter() - start
        state = wait_idle(base_url)
        time.sleep(0.5)
        rss_after = rss_mib(proc.pid)
        alive = proc.poll() is None and httpx.get(base_url + "/health").status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = summarize(outcomes, requests, concurrency, seconds, state, rss_before, rss_after, alive, warmup)
    return {**result, "server_flags": [*SERVER_FLAGS, *flags]}


def summarize(outcomes, requests, concurrency, seconds, state, rss_before, rss_after, alive, warmup) -> dict:
    counts = Counter(o.outcome for o in outcomes)
    by_kind = Counter((o.kind.endpoint, "stream" if o.kind.stream else "whole", "image" if o.kind.image else "text",
                       "sdk" if o.kind.sdk else "httpx", o.outcome) for o in outcomes)
    growth = (rss_after - rss_before) / rss_before
    checks = {
        "every request accounted for": len(outcomes) == requests and sum(counts[k] for k in OUTCOMES[:3]) == requests,
        "no errors": counts["error"] == 0,
        "some refused with 503": counts["refused"] > 0,
        "some aborted by disconnect": counts["aborted"] > 0,
        "clients that stay are never aborted": all(o.outcome != "aborted" for o in outcomes
                                                   if o.kind.disconnect_after is None),
        "no running or waiting request": state["running"] == 0 and state["waiting"] == 0,
        "every cache block free": state["blocks_used"] == 0,
        "RSS within 10% of after warm-up": abs(growth) <= 0.10,
        "server alive": alive,
    }
    return {
        "requests": requests, "concurrency": concurrency, "warmup_requests": warmup, "seconds": round(seconds, 1),
        "outcomes": {k: counts[k] for k in OUTCOMES},
        "streamed": sum(o.kind.stream for o in outcomes), "with_images": sum(o.kind.image for o in outcomes),
        "through_sdk": sum(o.kind.sdk for o in outcomes), "slow_readers": sum(o.kind.slow for o in outcomes),
        "disconnecting": sum(o.kind.disconnect_after is not None for o in outcomes),
        "engine_after": state, "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
        "rss_growth": round(growth, 4), "checks": checks, "ok": all(checks.values()),
        "errors": [asdict(o) for o in outcomes if o.outcome == "error"][:20],
        "by_kind": [{"kind": "/".join(k[:4]), "outcome": k[4], "count": n} for k, n in sorted(by_kind.items())],
    }


def format_table(r: dict) -> str:
    lines = [f"soak: {r['requests']} requests, {r['concurrency']} concurrent clients, {r['seconds']} s "
             f"(after {r['warmup_requests']} warm-up requests); tpa-serve {' '.join(r['server_flags'])}",
             f"  streamed {r['streamed']}, with images {r['with_images']}, through the SDK {r['through_sdk']}, "
             f"slow readers {r['slow_readers']}, disconnecting {r['disconnecting']}",
             "  outcome     count"]
    lines += [f"  {k:<11} {r['outcomes'][k]:>5}" for k in OUTCOMES]
    lines.append(f"  engine after: {r['engine_after']}")
    lines.append(f"  RSS: {r['rss_mib_before']} MiB after warm-up, {r['rss_mib_after']} MiB at the end "
                 f"({r['rss_growth']:+.1%})")
    lines += [f"  [{'ok' if ok else 'FAIL'}] {name}" for name, ok in r["checks"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=48)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/soak.json")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = soak(args.requests, args.concurrency, args.seed, args.warmup)
    print(format_table(result))
    for error in result["errors"]:
        print("  error:", error["detail"])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
