"""Online serving benchmark: streaming chat completions against any OpenAI-compatible server.

Sends a fixed number of requests to POST {base_url}/v1/chat/completions (stream: true, usage included), arriving as
a Poisson process (--request-rate) and/or capped at a number in flight (--concurrency), and reports TTFT, TPOT, ITL,
end-to-end latency (mean, median, p99 in ms) and request/token throughput, with the metrics defined as in vLLM's
serving benchmark so the numbers are comparable.

Usage:
  python bench/serve.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4 \\
      --input-len 256 --output-len 128 [--concurrency 16] [--model ID] [--api-key KEY] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river stone light green quiet open small large early late simple clear strong warm cold bright"
).split()

STATS = ("mean", "median", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


@dataclass
class BenchSettings:
    """Everything that shapes a run; stored with the results so a number can be traced to its settings."""

    num_prompts: int = 100
    request_rate: float = math.inf  # requests per second (Poisson arrivals); inf sends all at once
    concurrency: int | None = None  # cap on requests in flight; None = no cap
    input_len: int = 128  # words per prompt
    input_len_range: tuple[int, int] | None = None  # uniform random words per prompt, overrides input_len
    output_len: int = 128  # max_tokens
    output_len_range: tuple[int, int] | None = None  # uniform random max_tokens, overrides output_len
    ignore_eos: bool = True
    seed: int = 0
    model: str | None = None  # None: the first id from GET /v1/models
    api_key: str | None = None
    timeout: float = 300.0  # seconds per request, from send to the end of the stream

    def validate(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be > 0 (use inf for all at once)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("input_len and output_len must be at least 1")
        for name in ("input_len_range", "output_len_range"):
            span = getattr(self, name)
            if span is not None and not 1 <= span[0] <= span[1]:
                raise ValueError(f"{name} must satisfy 1 <= LO <= HI, got {span}")
        if not self.timeout > 0:
            raise ValueError("timeout must be > 0")


@dataclass
class RequestSpec:
    prompt: str
    input_words: int
    max_tokens: int


@dataclass
class RequestRecord:
    """What one request did; times are time.perf_counter() seconds."""

    input_words: int
    max_tokens: int
    send_time: float = 0.0
    first_token_time: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # every content chunk, the first included
    end_time: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    success: bool = False
    error: str | None = None


def make_requests(settings: BenchSettings) -> list[RequestSpec]:
    """Seeded random-word prompts; their own generator so changing the arrival pattern keeps the same prompts."""
    rng = random.Random(settings.seed)
    specs = []
    for _ in range(settings.num_prompts):
        n_words = rng.randint(*settings.input_len_range) if settings.input_len_range else settings.input_len
        max_tokens = rng.randint(*settings.output_len_range) if settings.output_len_range else settings.output_len
        prompt = " ".join(rng.choice(WORDS) for _ in range(n_words))
        specs.append(RequestSpec(prompt=prompt, input_words=n_words, max_tokens=max_tokens))
    return specs


def arrival_offsets(settings: BenchSettings) -> list[float]:
    """Send offsets in seconds from the start: exponential gaps with mean 1/rate, or all zero for an infinite rate."""
    if math.isinf(settings.request_rate):
        return [0.0] * settings.num_prompts
    rng = random.Random(settings.seed + 1)
    offsets, t = [], 0.0
    for _ in range(settings.num_prompts):
        offsets.append(t)
        t += rng.expovariate(settings.request_rate)
    return offsets


def headers(settings: BenchSettings) -> dict[str, str]:
    return {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}


async def fetch_model_id(client: httpx.AsyncClient, base_url: str, settings: BenchSettings) -> str:
    response = await client.get(f"{base_url}/v1/models", headers=headers(settings))
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no models; pass --model")
    return models[0]["id"]


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, settings: BenchSettings,
                     record: RequestRecord) -> None:
    """Send one streaming request and fill in record as chunks arrive (partial times survive a timeout)."""
    record.send_time = time.perf_counter()
    content_chunks = 0
    async with client.stream("POST", url, json=body, headers=headers(settings)) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            record.error = f"HTTP {response.status_code}: {text[:500]}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:  # servers report failures after the 200 header as an error event
                record.error = f"stream error: {json.dumps(chunk['error'])[:500]}"
                return
            choices = chunk.get("choices") or []
            if choices and (choices[0].get("delta") or {}).get("content"):
                now = time.perf_counter()
                if record.first_token_time is None:
                    record.first_token_time = now
                record.chunk_times.append(now)
                content_chunks += 1
            usage = chunk.get("usage")
            if usage:
                record.prompt_tokens = usage.get("prompt_tokens")
                record.output_tokens = usage.get("completion_tokens") or 0
    record.end_time = time.perf_counter()
    if record.output_tokens == 0:  # no usage chunk: one token per content chunk is the best guess
        record.output_tokens = content_chunks
    record.success = True


async def send_request(client: httpx.AsyncClient, base_url: str, model: str, spec: RequestSpec,
                       settings: BenchSettings) -> RequestRecord:
    """One request, bounded by the timeout; any failure becomes record.error instead of an exception."""
    record = RequestRecord(input_words=spec.input_words, max_tokens=spec.max_tokens)
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if settings.ignore_eos:
        body["ignore_eos"] = True
    try:
        await asyncio.wait_for(stream_one(client, f"{base_url}/v1/chat/completions", body, settings, record),
                               timeout=settings.timeout)
    except asyncio.TimeoutError:
        record.error = f"timeout after {settings.timeout:g} s"
    except Exception as exc:  # a benchmark records failures and keeps going
        record.error = f"{type(exc).__name__}: {exc}"
    if not record.success:
        record.end_time = time.perf_counter()
    return record


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def describe(values_s: list[float]) -> dict[str, float | None]:
    """mean, median and p99 in milliseconds; None when nothing was measured."""
    if not values_s:
        return {stat: None for stat in STATS}
    ms = [v * 1000 for v in values_s]
    return {"mean": statistics.fmean(ms), "median": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize(records: list[RequestRecord], duration: float) -> dict[str, Any]:
    """Aggregate metrics over successful requests; duration is the benchmark's wall time in seconds."""
    done = [r for r in records if r.success]
    ttft = [r.first_token_time - r.send_time for r in done if r.first_token_time is not None]
    tpot = [(r.end_time - r.first_token_time) / (r.output_tokens - 1)
            for r in done if r.first_token_time is not None and r.output_tokens > 1]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    e2el = [r.end_time - r.send_time for r in done]
    input_tokens = sum(r.prompt_tokens or 0 for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    summary: dict[str, Any] = {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(records) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_token_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
    }
    for name, values in zip(LATENCIES, (ttft, tpot, itl, e2el)):
        for stat, value in describe(values).items():
            summary[f"{stat}_{name}_ms"] = value
    summary["errors"] = [r.error for r in records if not r.success]
    return summary


def request_rows(records: list[RequestRecord], start: float) -> list[dict[str, Any]]:
    """Per-request numbers for the JSON file, times in ms relative to the benchmark start."""
    rows = []
    for r in records:
        ttft = (r.first_token_time - r.send_time) * 1000 if r.first_token_time is not None else None
        rows.append({
            "send_offset_ms": (r.send_time - start) * 1000,
            "ttft_ms": ttft,
            "e2el_ms": (r.end_time - r.send_time) * 1000,
            "input_words": r.input_words,
            "max_tokens": r.max_tokens,
            "prompt_tokens": r.prompt_tokens,
            "output_tokens": r.output_tokens,
            "success": r.success,
            "error": r.error,
        })
    return rows


async def run_benchmark(base_url: str, settings: BenchSettings) -> dict[str, Any]:
    """Send settings.num_prompts requests on the arrival schedule and return settings, summary and per-request rows."""
    settings.validate()
    base_url = base_url.rstrip("/")
    specs = make_requests(settings)
    offsets = arrival_offsets(settings)
    limit = asyncio.Semaphore(settings.concurrency) if settings.concurrency else None
    # No pool cap (the arrival pattern decides what is in flight); trust_env=False keeps proxies out of the timings.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(settings.timeout), limits=limits, trust_env=False) as client:
        model = settings.model or await fetch_model_id(client, base_url, settings)

        async def limited(spec: RequestSpec) -> RequestRecord:
            if limit is None:
                return await send_request(client, base_url, model, spec, settings)
            async with limit:
                return await send_request(client, base_url, model, spec, settings)

        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        start = time.perf_counter()
        tasks = []
        for spec, offset in zip(specs, offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(spec)))
        records = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    saved = asdict(settings)
    saved["api_key"] = "***" if settings.api_key else None
    saved["request_rate"] = "inf" if math.isinf(settings.request_rate) else settings.request_rate
    return {
        "base_url": base_url,
        "model": model,
        "started_at": started_at,
        "settings": saved,
        **summarize(records, duration),
        "requests": request_rows(records, start),
    }


def format_table(result: dict[str, Any]) -> str:
    """A readable summary for the terminal."""
    def num(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    s = result["settings"]
    lines = [
        f"{'Serving benchmark':=^60}",
        f"{'Model:':<40}{result['model']}",
        f"{'Request rate (req/s):':<40}{s['request_rate']}",
        f"{'Max concurrency:':<40}{s['concurrency'] or '-'}",
        f"{'Completed requests:':<40}{result['completed']}",
        f"{'Failed requests:':<40}{result['failed']}",
        f"{'Benchmark duration (s):':<40}{num(result['duration_s'])}",
        f"{'Total input tokens:':<40}{result['total_input_tokens']}",
        f"{'Total output tokens:':<40}{result['total_output_tokens']}",
        f"{'Request throughput (req/s):':<40}{num(result['request_throughput'])}",
        f"{'Output token throughput (tok/s):':<40}{num(result['output_token_throughput'])}",
        f"{'Total token throughput (tok/s):':<40}{num(result['total_token_throughput'])}",
    ]
    titles = {"ttft": "Time to first token", "tpot": "Time per output token (excl. 1st)",
              "itl": "Inter-token latency", "e2el": "End-to-end latency"}
    for name in LATENCIES:
        lines.append(f"{titles[name]:-^60}")
        for stat in STATS:
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<40}{num(result[f'{stat}_{name}_ms'])}")
    if result["errors"]:
        lines.append(f"{'Errors (first 3)':-^60}")
        lines += [f"  {e}" for e in result["errors"][:3]]
    lines.append("=" * 60)
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--model", default=None, help="model id; default: the first from GET /v1/models")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--num-prompts", type=int, default=100)
    parser.add_argument("--request-rate", type=float, default=math.inf,
                        help="Poisson arrival rate in requests/s; inf (default) sends all at once")
    parser.add_argument("--concurrency", type=int, default=None, help="maximum requests in flight")
    parser.add_argument("--input-len", type=int, default=128, help="words per prompt")
    parser.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="uniform random words per prompt (overrides --input-len)")
    parser.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--output-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                        help="uniform random max_tokens (overrides --output-len)")
    parser.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                        help="let requests stop at EOS (default sends ignore_eos: true)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        num_prompts=args.num_prompts,
        request_rate=args.request_rate,
        concurrency=args.concurrency,
        input_len=args.input_len,
        input_len_range=tuple(args.input_len_range) if args.input_len_range else None,
        output_len=args.output_len,
        output_len_range=tuple(args.output_len_range) if args.output_len_range else None,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        model=args.model,
        api_key=args.api_key,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = settings_from_args(args)
    try:
        settings.validate()
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    result = asyncio.run(run_benchmark(args.base_url, settings))
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
