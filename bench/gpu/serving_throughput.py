"""End-to-end serving on a GPU: how many long sessions our engine holds at once, and how fast it decodes all
of them together, with the factor cache against a standard cache, against transformers' `generate` with a
static cache, and against vLLM when it imports.

Models (--models): a name in tpa_model.model.config.PRESETS (`12b`) is that Gemma 3 shape with random weights, built
directly on the device (nothing of that size is initialised on the CPU); its factor side uses the preset with
TPA ranks R, so the factor weights are random too: speed is measured here, never quality. Any other name or
path (`smollm2`, `gemma-3-270m`) is a real checkpoint loaded by `load_model`; its factor side is the weight-space
conversion at ranks R. A rank that is full rank for the model (R >= kv heads, e.g. Gemma 3 270M with one kv
head) would be stored as the standard cache: that side is skipped and says so. Random-weight models take the
demo model's tokenizer (prompts are random token ids; the tokenizer only detokenizes).

Cells: each model at each of --contexts tokens where its max_position_embeddings allows (a context whose
prompt plus --max-tokens would pass the model's last position is shortened to fit: the table's `tokens`).
Sides of a cell:
  factor kR vR   our engine, TPA ranks R (--ranks), cache sized by the engine from --gpu-memory-utilization
  standard       our engine, exact (full rank): plain K and V, sliding-window layers keep their window
  transformers   `generate` with cache_implementation="static", sdpa attention, at the largest batch that fits
                 (from --max-sessions, halving on out-of-memory), prompts of the cell's length
  vllm           vLLM's offline LLM on the same device, when `import vllm` works (else skipped with the reason)

Our engine (one EngineConfig per side: max_model_len = context + --max-tokens, max_num_seqs --max-num-seqs):
- sessions: the engine's own capacity after it sizes its cache (`engine.capacity.sessions`, what its pools
  hold, and `engine_limit`, that capped by max_num_seqs). No formula: the pools the engine allocated.
- decode: n = min(engine_limit, --max-sessions) sessions of random-token prompts, greedy, ignore_eos, run by
  `engine.step()`. Continuous batching prefills one session after another while the sessions already
  prefilled decode, so with prompts of `context` tokens and --max-tokens outputs the first sessions would end
  long before the last one starts to decode, and the steps in which every chunk is a decode would hold only
  a few sessions. So every session gets `lag` fewer prompt tokens and `lag` more output tokens (its length is
  still max_model_len), where `lag` bounds the steps from the first session's end of prefill to the last
  one's: (n - 1) x prompt / (max_num_batched_tokens - n + 1), plus one. After the last prefill every step is a
  decode of all n sessions; the first --max-tokens of them are the window, timed with torch.cuda.synchronize()
  around each step (the host's whole step: schedule, forward, sample, detokenize), and the rest is aborted.
  decode tok/s = n x window steps / window seconds (the JSON adds n / the median step, which a kernel compiled
  inside the window would set apart); prefill s = the steps holding a prefill chunk (which also decode the
  sessions already prefilled); total s = every step up to the window's end. The table gives the sessions' mean
  context in the window (between context - lag and context + --max-tokens). Two short sessions run through the
  engine first (warm-up). A step's chunks are read by wrapping the scheduler's `schedule` (which the engine's
  step calls once; nothing else changes).
transformers: one `generate` call per batch after a warm-up call of the same shapes (which compiles the decode
step when transformers does so); a logits processor records the time (after a synchronize) each time a token
is chosen: the first stamp follows the prefill, and the N - 1 later ones each follow one decode forward, so
decode tok/s = batch x (N - 1) / (last stamp - first stamp), N = --max-tokens. Each `generate` call starts a
new cache, so this is the same as timing generate with N and with 1 new tokens and taking the difference,
without the noise of two long prefills. The random-weight model is transformers' Gemma3ForCausalLM
of the same shape (RoPE scaling left at its default: it does not change the time).
vllm: its own capacity is in its log ("Maximum concurrency"); decode tok/s = n x (N - 1) / (time of generate
with N tokens - time with 1), n = the most sessions one of our sides ran (vLLM queues what it cannot hold),
prefix caching off. Random-weight models use load_format="dummy" on the preset's config.

Targets (the issue), printed next to the figures at 32k context: the factor cache holds >= 3x the sessions and
decodes >= 2x the aggregate tokens/s of the standard cache, and decodes faster than transformers.

Usage: python bench/gpu/serving_throughput.py [--models 12b smollm2 gemma-3-270m] [--contexts 8192 32768 131072]
       [--ranks 2] [--max-tokens 64] [--max-sessions 256] [--out bench/results/gpu_serving_throughput.json]
       python bench/gpu/serving_throughput.py --models 12b --contexts 32768   (the targets' cell only)
       python bench/gpu/serving_throughput.py --smoke   (tiny models on the CPU, float32: checks the script's
                                                          code paths, measures nothing)
Needs CUDA (exit 2 without it, unless --smoke). Long contexts need activation headroom beyond what the engine's
warm-up measures (a prefill chunk over a long cached prefix peaks higher): lower --gpu-memory-utilization if a
128k cell runs out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import reference_model  # noqa: E402
from offline_throughput import random_prompts  # noqa: E402

from server.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from server.engine.llm import LLM  # noqa: E402
from tpa_model.cache.backends import BACKENDS  # noqa: E402
from tpa_model.checkpoints.demo import demo_model_dir  # noqa: E402
from tpa_model.checkpoints.loader import open_checkpoint  # noqa: E402
from tpa_model.checkpoints.named_models import resolve_model  # noqa: E402
from tpa_model.checkpoints.safetensors_files import is_tpa_checkpoint, read_config  # noqa: E402
from tpa_model.model.config import PRESETS, TextConfig, preset  # noqa: E402
from tpa_model.model.decoder import GemmaTPAModel  # noqa: E402
from tpa_model.sampling import SamplingParams  # noqa: E402
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer  # noqa: E402

TARGET_CONTEXT = 32768
TARGETS = {"sessions_x_standard": 3.0, "decode_x_standard": 2.0, "decode_x_transformers": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["12b", "smollm2", "gemma-3-270m"],
                   help="preset names (random weights) or checkpoints load_model takes")
    p.add_argument("--contexts", nargs="+", type=int, default=[8192, 32768, 131072], help="prompt tokens")
    p.add_argument("--ranks", nargs="+", type=int, default=[2], help="R_K = R_V of the factor sides")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens timed per session")
    p.add_argument("--max-sessions", type=int, default=256, help="at most this many sessions decode together")
    p.add_argument("--max-num-seqs", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="per step; larger shortens the prefill lag (see the docstring)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--attention-backend", default="auto", choices=BACKENDS)
    p.add_argument("--enforce-eager", action="store_true", help="our engine without CUDA graphs for decode steps")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM side")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default: bench/results/gpu_serving_throughput.json; none in --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: checks the script")
    args = p.parse_args(argv)
    args.device, args.cache_memory, args.target_context = "cuda", None, TARGET_CONTEXT
    if args.smoke:
        args.models, args.contexts, args.ranks, args.max_tokens = ["tiny", "demo"], [64], [1], 2
        args.max_sessions, args.max_num_seqs, args.max_num_batched_tokens = 4, 8, 256
        args.dtype, args.device, args.cache_memory, args.target_context = "float32", "cpu", 0.0002, 64
    return args


# -- devices and models -----------------------------------------------------------------------------------


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished what was queued (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def free_memory(device: torch.device) -> None:
    """Drop what the last side left, so the next engine sizes its cache from a clean device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def built_on(device: torch.device, dtype: torch.dtype):
    """Modules created inside get their parameters on `device` in `dtype` at once: a 12b model is never
    initialised on the CPU, nor first in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def text_config(name: str) -> TextConfig:
    """A model's config without its weights: the preset, or read from the checkpoint."""
    if name in PRESETS:
        return preset(name)
    _, config, files = open_checkpoint(resolve_model(name))
    files.close()
    return config


def random_model(name: str, rank: int | None, dtype: torch.dtype, device: torch.device) -> GemmaTPAModel:
    """The preset with random weights (PyTorch's default init), at TPA ranks `rank` (None: exact)."""
    config = preset(name) if rank is None else preset(name).with_ranks(rank, rank)
    with built_on(device, dtype):
        return GemmaTPAModel(config).eval()


def build_engine(name: str, rank: int | None, max_model_len: int, args) -> LLMEngine:
    """Our engine as a user gets it: LLM(...) for a checkpoint, LLMEngine on the random model for a preset."""
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, cache_memory_gib=args.cache_memory,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          attention_backend=args.attention_backend,
                          cuda_graphs=False if args.enforce_eager else None)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if name in PRESETS:
        return LLMEngine(random_model(name, rank, dtype, device), load_tokenizer(demo_model_dir()), config)
    ranks = {} if rank is None else {"k_rank": rank, "v_rank": rank}
    return LLM(name, dtype=dtype, device=args.device, engine_config=config, **ranks).engine


def prompt_ids(n: int, length: int, vocab: int, bos: int, seed: int = 0) -> list[list[int]]:
    return random_prompts(n, length, length, vocab, bos, seed)


# -- our engine ---------------------------------------------------------------------------------------------


class ChunkRecorder:
    """Keeps the chunks of the engine's latest step: `step()` does not return them, and the benchmark must
    tell the steps that only decode from those that prefill."""

    def __init__(self, scheduler):
        self.chunks: list = []
        self.schedule = scheduler.schedule
        scheduler.schedule = self

    def __call__(self):
        self.chunks = self.schedule()
        return self.chunks


def is_decode(chunk) -> bool:
    """The chunk computes one generated token (a prompt's last token alone is still prefill)."""
    return chunk.length == 1 and chunk.start >= len(chunk.seq.prompt_ids)


def prefill_lag(n: int, prompt: int, budget: int) -> int:
    """Steps, at most, from the first session's end of prefill to the last one's: the other prompts' tokens,
    at least budget - (n - 1) of them a step (each prefilled session's decode takes one token of the budget)."""
    return -(-(n - 1) * prompt // (budget - n + 1)) + 1


def check(outputs) -> None:
    """A failed request would silently shrink the batch: the measurement would be wrong, so stop."""
    for out in outputs:
        if out.error is not None:
            raise RuntimeError(f"request {out.request_id} failed during the benchmark: {out.error!r}")


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, prefix: str) -> None:
    for i, ids in enumerate(prompts):
        engine.add_request(f"{prefix}-{i}", ids, params)


def warm_up(engine: LLMEngine, context: int, args) -> None:
    """Two short sessions through prefill and decode first: kernel compilation and first allocations stay out
    of the timed steps. Their prompts share nothing with the timed ones (another seed)."""
    vocab = min(engine.tokenizer.vocab_size, engine.model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=min(4, args.max_tokens), ignore_eos=True)
    run_requests(engine, prompt_ids(2, min(context, 1024), vocab, engine.tokenizer.bos_id, seed=1), params, "warm-up")
    while engine.has_unfinished():
        check(engine.step())


def decode_window(engine: LLMEngine, n: int, context: int, args) -> dict:
    """Admit n sessions whose lengths absorb the prefill lag, then time them (see the module docstring)."""
    budget = args.max_num_batched_tokens
    if n > budget // 2:
        return {"skipped": f"{n} sessions need --max-num-batched-tokens above {2 * n} to prefill beside decodes"}
    lag = prefill_lag(n, context, budget)
    if lag > context // 2:
        return {"skipped": f"prefill lag of {lag} tokens is over half the context: raise --max-num-batched-tokens"}
    vocab = min(engine.tokenizer.vocab_size, engine.model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens + lag, ignore_eos=True)
    run_requests(engine, prompt_ids(n, context - lag, vocab, engine.tokenizer.bos_id), params, "session")
    return {"batch": n, "prompt_tokens": context - lag, "lag": lag} | timed_steps(engine, n, args.max_tokens)


def timed_steps(engine: LLMEngine, n: int, out: int) -> dict:
    """engine.step() until the n sessions have decoded `out` steps together (the window), each step timed and
    sorted by its chunks; then the sessions are aborted."""
    recorder, device = ChunkRecorder(engine.scheduler), engine.model.device
    prefill_s, other_s, window, positions = 0.0, 0.0, [], 0
    start = clock(device)
    while engine.has_unfinished() and len(window) < out:
        begin = clock(device)
        check(engine.step())
        seconds = clock(device) - begin
        chunks = recorder.chunks
        if not all(is_decode(c) for c in chunks):
            prefill_s += seconds
        elif len(chunks) == n:
            window.append(seconds)
            positions += sum(c.start + 1 for c in chunks)
        else:  # decodes of fewer sessions: none if the lag bound holds
            other_s += seconds
    total_s = clock(device) - start
    for request_id in list(engine.requests):
        engine.abort(request_id)
    decode_s = sum(window)
    return {"window_steps": len(window), "window_context": positions / (n * len(window)) if window else None,
            "decode_tok_s": n * len(window) / decode_s if window else None,
            "decode_tok_s_median_step": n / statistics.median(window) if window else None, "decode_s": decode_s,
            "prefill_s": prefill_s, "other_decode_s": other_s, "total_s": total_s,
            "preemptions": engine.num_preemptions}


def engine_side(name: str, rank: int | None, context: int, args) -> dict:
    """One side of our engine; a side that does not fit the device is reported, and the other cells go on."""
    try:
        return engine_figures(name, rank, context, args)
    except (torch.OutOfMemoryError, ValueError) as e:  # ValueError: the engine found no memory for its cache
        return {"skipped": f"{type(e).__name__}: {e}"[:300]}
    except Exception as e:  # any other failure is recorded in its row, with the traceback on stderr
        return failed(e)


def failed(e: Exception) -> dict:
    traceback.print_exc()
    return {"skipped": f"failed: {type(e).__name__}: {e}"[:300]}


def engine_figures(name: str, rank: int | None, context: int, args) -> dict:
    """Our engine's capacity at this context, then its decode window."""
    engine = build_engine(name, rank, context + args.max_tokens, args)
    cap = engine.capacity
    row = {"sessions": cap.sessions, "engine_limit": cap.engine_limit, "cache_gib": cap.cache_bytes / 2**30,
           "bytes_per_token": cap.bytes_per_token, "backend": engine.runner.backend.name,
           "cuda_graphs": engine.runner.graphs is not None}
    n = min(cap.engine_limit, args.max_sessions)
    warm_up(engine, context, args)
    row |= decode_window(engine, n, context, args) if n > 0 else {"skipped": "the cache holds no session"}
    del engine
    return row


# -- transformers ---------------------------------------------------------------------------------------------


class StepClock:
    """A logits processor that stamps the time each token is chosen: after the prefill, then after each
    decode forward."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        self.stamps.append(clock(self.device))
        return scores


def hf_config(name: str):
    """transformers' config of a preset's shape (Gemma3TextConfig)."""
    import transformers

    c = preset(name)
    return transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, query_pre_attn_scalar=c.query_pre_attn_scalar,
        sliding_window=c.sliding_window, layer_types=list(c.layer_types),
        max_position_embeddings=c.max_position_embeddings, attn_implementation="sdpa")


def hf_model(name: str, args):
    """transformers' model: the preset's shape with random weights built on the device, or the checkpoint."""
    import transformers

    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    if name in PRESETS:
        with built_on(device, dtype):
            return transformers.Gemma3ForCausalLM(hf_config(name)).eval()
    return reference_model(resolve_model(name), dtype).to(device)


def hf_generate(model, batch: int, context: int, args) -> dict | None:
    """One timed `generate` after a warm-up of the same shapes; None when it runs out of memory."""
    from transformers import LogitsProcessorList

    device, out = torch.device(args.device), args.max_tokens
    ids = torch.tensor(prompt_ids(batch, context, model.config.vocab_size, model.config.bos_token_id or 0),
                       device=device)
    stamps = StepClock(device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, cache_implementation="static",
                  max_cache_len=context + out, pad_token_id=0, logits_processor=LogitsProcessorList([stamps]))
    try:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=min(out, 3), min_new_tokens=min(out, 3), **kwargs)
            stamps.stamps.clear()
            start = clock(device)
            model.generate(ids, max_new_tokens=out, min_new_tokens=out, **kwargs)
            total_s = clock(device) - start
    except torch.OutOfMemoryError:
        return None
    t = stamps.stamps
    decode_s = t[-1] - t[0]
    return {"batch": batch, "prompt_tokens": context, "decode_tok_s": batch * (len(t) - 1) / decode_s,
            "decode_s": decode_s, "prefill_s": t[0] - start, "total_s": total_s}


def transformers_side(name: str, context: int, args) -> dict:
    """transformers' decode at the largest batch that fits, halving from --max-sessions."""
    path = None if name in PRESETS else resolve_model(name)
    if path is not None and path.is_dir() and is_tpa_checkpoint(read_config(path)):
        return {"skipped": "a TPA checkpoint: transformers cannot load it"}
    if args.max_tokens < 2:
        return {"skipped": "needs --max-tokens >= 2 to time a decode step"}
    model = hf_model(name, args)
    batch, result = args.max_sessions, None
    while batch >= 1 and result is None:
        free_memory(torch.device(args.device))
        result = hf_generate(model, batch, context, args)
        batch //= 2
    del model
    return result or {"skipped": "out of memory at batch 1"}


# -- vLLM (optional) ------------------------------------------------------------------------------------------


def vllm_side(name: str, context: int, n: int, args) -> dict:
    """vLLM's decode tok/s by the difference of two generate calls; skipped, with the reason, if it fails."""
    if args.no_vllm:
        return {"skipped": "--no-vllm"}
    try:
        import vllm
    except ImportError as e:
        return {"skipped": f"vllm does not import ({e})"}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return vllm_decode(vllm, name, context, n, Path(tmp), args)
    except Exception as e:  # an optional side: say why and go on with the others
        return {"skipped": f"vllm failed: {e!r}"[:300]}


def vllm_decode(vllm, name: str, context: int, n: int, tmp: Path, args) -> dict:
    model, load = str(resolve_model(name)), "auto"
    if name in PRESETS:
        hf_config(name).save_pretrained(tmp)
        model, load = str(tmp), "dummy"
    llm = vllm.LLM(model=model, load_format=load, dtype=args.dtype, max_model_len=context + args.max_tokens,
                   gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                   enable_prefix_caching=False, skip_tokenizer_init=True, seed=0)
    config = text_config(name)
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids(n, context, config.vocab_size, config.bos_token_id)]

    def run(tokens: int, batch: list) -> float:
        params = vllm.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        start = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start

    run(2, prompts[:1])  # warm-up
    one, full = run(1, prompts), run(args.max_tokens, prompts)
    return {"batch": n, "prompt_tokens": context, "decode_tok_s": n * (args.max_tokens - 1) / (full - one),
            "decode_s": full - one, "prefill_s": one, "total_s": full}


# -- cells, ratios, targets, table ----------------------------------------------------------------------------


def cell_context(context: int, config: TextConfig, out: int) -> int | None:
    """The prompt length of a cell: the context, shortened so that prompt + outputs fit the model's positions;
    None when the model does not reach the context at all."""
    if context > config.max_position_embeddings:
        return None
    return min(context, config.max_position_embeddings - out)


def cell_rows(name: str, config: TextConfig, context: int, args) -> list[dict]:
    """Every side of one (model, context) cell, freeing the device between sides."""
    base = {"model": name, "context": context}
    length = cell_context(context, config, args.max_tokens)
    if length is None:
        return [base | {"side": "all", "skipped": f"beyond max_position_embeddings "
                                                   f"{config.max_position_embeddings}"}]
    base["cell_tokens"] = length
    G, device = config.num_key_value_heads, torch.device(args.device)
    sides = []
    for rank in args.ranks:
        if rank >= G:
            row = {"skipped": f"rank {rank} is full rank for {G} kv head(s): stored as the standard cache"}
        else:
            row = engine_side(name, rank, length, args)
        sides.append((f"factor k{rank} v{rank}", row))
        free_memory(device)
    sides.append(("standard", engine_side(name, None, length, args)))
    free_memory(device)
    try:
        hf = {"skipped": "--no-transformers"} if args.no_transformers else transformers_side(name, length, args)
    except Exception as e:
        hf = failed(e)
    sides.append(("transformers", hf))
    free_memory(device)
    ours = [r["batch"] for side, r in sides if side != "transformers" and "batch" in r]
    sides.append(("vllm", vllm_side(name, length, max(ours, default=1), args)))  # vLLM queues what it cannot hold
    free_memory(device)
    return [base | {"side": side} | row for side, row in sides]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def add_ratios(rows: list[dict]) -> None:
    """Per row of our engine: sessions and decode tok/s over the standard side's, decode over transformers'."""
    by_cell = {}
    for r in rows:
        by_cell.setdefault((r["model"], r["context"]), {})[r["side"]] = r
    for r in rows:
        cell = by_cell[(r["model"], r["context"])]
        standard, hf = cell.get("standard", {}), cell.get("transformers", {})
        if r["side"].startswith("factor"):
            r["sessions_x_standard"] = ratio(r.get("sessions"), standard.get("sessions"))
            r["decode_x_standard"] = ratio(r.get("decode_tok_s"), standard.get("decode_tok_s"))
        if r["side"].startswith("factor") or r["side"] == "standard":
            r["decode_x_transformers"] = ratio(r.get("decode_tok_s"), hf.get("decode_tok_s"))


def targets(rows: list[dict], context: int) -> list[dict]:
    """The issue's targets, checked on every factor row at the target context."""
    found = []
    for r in rows:
        if r["context"] != context or not r["side"].startswith("factor") or "skipped" in r:
            continue
        for key, floor in TARGETS.items():
            value = r.get(key)
            met = None if value is None else (value > floor if key == "decode_x_transformers" else value >= floor)
            found.append({"model": r["model"], "side": r["side"], "context": context, "target": key,
                          "floor": floor, "value": value, "met": met})
    return found


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], found: list[dict], context: int, smoke: bool) -> None:
    print(f"{'model':<13} {'context':>7} {'tokens':>6} {'side':<13} {'sessions':>8} {'limit':>5} {'batch':>5} "
          f"{'prompt':>7} {'win ctx':>7} {'decode tok/s':>12} {'prefill s':>9} {'total s':>8} {'x std ses':>9} "
          f"{'x std dec':>9} {'x hf dec':>8}")
    for r in rows:
        head = f"{r['model']:<13} {r['context']:>7} {fmt(r.get('cell_tokens'), 'd'):>6} {r['side']:<13}"
        if "skipped" in r:
            print(f"{head} skipped: {r['skipped']}")
            continue
        print(f"{head} {fmt(r.get('sessions'), 'd'):>8} {fmt(r.get('engine_limit'), 'd'):>5} {r['batch']:>5} "
              f"{r['prompt_tokens']:>7} {fmt(r.get('window_context'), '.0f'):>7} {fmt(r['decode_tok_s']):>12} "
              f"{r['prefill_s']:>9.2f} {r['total_s']:>8.2f} {fmt(r.get('sessions_x_standard'), '.2f'):>9} "
              f"{fmt(r.get('decode_x_standard'), '.2f'):>9} {fmt(r.get('decode_x_transformers'), '.2f'):>8}")
    print("tokens: the cell's context as the model's positions allow; sessions: the engine's capacity at tokens + "
          "output tokens (limit: capped by --max-num-seqs); batch: sessions decoding together; decode tok/s: all "
          "sessions' tokens over the decode-only steps")
    if not found:
        print(f"targets (at {context} tokens): no factor side measured at that context in this run")
    for t in found:
        state = "not judged (smoke)" if smoke else {None: "not measured", True: "met", False: "not met"}[t["met"]]
        op = ">" if t["target"] == "decode_x_transformers" else ">="
        print(f"target ({t['context']} tokens) {t['model']} {t['side']}: {t['target']} {fmt(t['value'], '.2f')} "
              f"({op} {t['floor']:g}): {state}")


def device_name(args) -> str:
    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu (smoke: measures nothing)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu/serving_throughput.py needs a CUDA device (torch.cuda.is_available() is False): nothing "
              "was measured. Run it on a GPU, or with --smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING if args.smoke else logging.INFO, format="%(message)s")
    out = args.out or (None if args.smoke else ROOT / "bench/results/gpu_serving_throughput.json")
    rows = []
    for name in args.models:
        config = text_config(name)
        for context in args.contexts:
            for row in cell_rows(name, config, context, args):
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            write_results(out, rows, None, args)  # a run cut short keeps the cells it finished
    add_ratios(rows)
    found = targets(rows, args.target_context)
    print_table(rows, found, args.target_context, args.smoke)
    write_results(out, rows, found, args)
    print(f"device {device_name(args)}; results: {out}")
    return 0


def write_results(out: Path | None, rows: list[dict], found: list[dict] | None, args) -> None:
    """The JSON results; `complete` is false, and there are no targets, until every cell has run."""
    if out is None:
        return
    import transformers

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"device": device_name(args), "torch": torch.__version__, "transformers": transformers.__version__,
              "smoke": args.smoke, "complete": found is not None, "settings": settings, "rows": rows,
              "targets": found or []}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
