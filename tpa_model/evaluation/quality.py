"""What a conversion (or healing) costs: a candidate model measured against its original on held-out text.

Below full rank the model changes (DESIGN.md section 1), so every capacity figure comes with these numbers:

* perplexity of both models on the evaluation side of `tpa_model.evaluation.texts` (never seen by calibration or
  healing), the mean next-token KL(original || candidate) and top-1 agreement on the same positions;
* greedy-continuation agreement on chat prompts: each model continues each prompt greedily, and we count
  identical tokens position by position and the tokens before the first divergence;
* passkey retrieval: a random five-digit key hidden at several depths of a haystack of evaluation prose,
  at several lengths; a trial passes when the greedy answer contains the key;
* per-layer sensitivity (`layer_sensitivity`): the KL when only one layer is reduced.

A `QualityReport` also carries the cache bytes per token of both models at one session length, against a
standard cache, so that reports place on a quality-versus-cache-size frontier (`plot_frontier`).
Defaults are sized for a CPU: a few thousand tokens and a few dozen short prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache.capacity import standard_layout, tpa_layout
from ..cache.quantization import AUTO, KVCacheDtype
from ..compression.convert import head_basis, head_covariance
from ..generation import generate
from ..model.attention import FactorProjection
from ..model.decoder import GemmaTPAModel

# Chat prompts for greedy-continuation agreement: everyday questions any small chat model can take a stab at.
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about autumn leaves.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Name three primary colors.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Suggest a name for a friendly robot.",
    "How many days are there in a leap year?",
    "Describe a cat to someone who has never seen one.",
    "What is photosynthesis?",
    "Write one sentence about the ocean.",
    "What are the benefits of regular exercise?",
    "How do you make a cup of tea?",
    "What is the largest planet in the solar system?",
    "Tell me a fun fact about bees.",
    "What is a prime number?",
    "Give an example of a renewable energy source.",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hiking trip?",
    "Explain gravity to a child.",
    "What is the boiling point of water at sea level?",
    "List three fruits that are red.",
    "Why do we have seasons?",
    "What is the purpose of a password?",
    "Write a short greeting for a birthday card.",
    "What is the difference between a virus and a bacterium?",
    "How can I learn a new language faster?",
    "What does a librarian do?",
)

PASSKEY_INTRO = "A pass key is hidden somewhere in the text below. Find it and remember it: you will be asked for it."
PASSKEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_ANSWER_TOKENS = 10
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)


@dataclass
class PasskeyResult:
    length: int  # prompt tokens
    depth: float  # where the key sits in the haystack, 0 = start, 1 = end
    trials: int
    original_correct: int
    candidate_correct: int


@dataclass
class QualityReport:
    original: str
    candidate: str
    kv_heads: int
    k_rank: int  # the candidate's
    v_rank: int
    text_source: str
    eval_tokens: int  # predicted tokens, over eval_sequences sequences
    eval_sequences: int
    perplexity_original: float
    perplexity_candidate: float
    kl: float  # mean next-token KL(original || candidate), nats per token
    top1_agreement: float
    chat_prompts: int
    greedy_tokens: int  # greedy tokens per prompt (at most; generation stops at a stop token)
    greedy_agreement: float  # identical tokens / compared positions
    greedy_prefix: float  # mean tokens before the first divergence
    passkey: list[PasskeyResult]
    session_len: int  # the session length the cache figures are for
    cache_dtype: str
    bytes_per_token_original: float
    bytes_per_token_candidate: float
    bytes_per_token_standard: float  # a standard GQA cache (with window freeing) of the same model
    layer_kl: list[float] | None = None  # per-layer sensitivity: KL with only that layer reduced
    kv_cache_dtype: str = "auto"  # how the candidate's cache stores keys and values (quantization.py)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage

    @property
    def perplexity_change(self) -> float:
        """Relative change: candidate / original - 1 (0 for an unchanged model)."""
        return self.perplexity_candidate / self.perplexity_original - 1.0

    @property
    def cache_fraction(self) -> float:
        """The candidate's cache per token as a fraction of a standard cache: the frontier's x axis."""
        return self.bytes_per_token_candidate / self.bytes_per_token_standard

    def passkey_accuracy(self, which: str = "candidate", length: int | None = None) -> float:
        rows = [r for r in self.passkey if length is None or r.length == length]
        trials = sum(r.trials for r in rows)
        return sum(getattr(r, f"{which}_correct") for r in rows) / trials if trials else float("nan")

    def metric(self, name: str) -> float:
        """A figure by name, for frontiers: perplexity, perplexity_change, kl, top1_agreement,
        greedy_agreement, greedy_prefix or passkey_accuracy (the candidate's)."""
        if name == "perplexity":
            return self.perplexity_candidate
        if name == "passkey_accuracy":
            return self.passkey_accuracy()
        return float(getattr(self, name))

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(metric, original, candidate, note) rows of the table."""
        rows = [
            ("perplexity", f"{self.perplexity_original:.3f}", f"{self.perplexity_candidate:.3f}",
             f"{self.perplexity_change:+.1%}"),
            ("next-token KL(orig || cand)", "-", f"{self.kl:.4f}", "nats/token"),
            ("top-1 agreement", "-", f"{self.top1_agreement:.1%}", ""),
            (f"greedy agreement ({self.chat_prompts} chats)", "-", f"{self.greedy_agreement:.1%}",
             f"{self.greedy_prefix:.1f} of {self.greedy_tokens} tokens before first divergence"),
        ]
        for length in sorted({r.length for r in self.passkey}):
            subset = [r for r in self.passkey if r.length == length]
            trials = sum(r.trials for r in subset)
            depths = ", ".join(f"{r.depth:g}" for r in subset)
            rows.append((f"passkey @ {length} tokens", f"{sum(r.original_correct for r in subset)}/{trials}",
                         f"{sum(r.candidate_correct for r in subset)}/{trials}", f"depths {depths}"))
        standard = f"{self.bytes_per_token_standard:.0f}, {self.cache_dtype}"
        rows.append((f"cache bytes/token @ {self.session_len}", f"{self.bytes_per_token_original:.0f}",
                     f"{self.bytes_per_token_candidate:.0f}", f"{self.cache_fraction:.3f} of standard ({standard})"))
        return rows

    def format(self) -> str:
        head = [f"{self.candidate} (k_rank {self.k_rank}, v_rank {self.v_rank} of {self.kv_heads} kv heads, "
                f"cache {self.kv_cache_dtype}) against {self.original}",
                f"held-out text: {self.text_source}, {self.eval_tokens} tokens in {self.eval_sequences} sequences"]
        table = [("metric", "original", "candidate", "")] + self.rows()
        widths = [max(len(r[i]) for r in table) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in table]
        lines.insert(1, "-" * len(lines[0]))
        if self.layer_kl is not None:
            lines.append("per-layer sensitivity, KL with only that layer reduced (nats/token):")
            lines += [f"  layer {i:>3}: {kl:.5f}" for i, kl in enumerate(self.layer_kl)]
        if self.timings:
            lines.append("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings.items()))
        return "\n".join(head + lines)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict:
        """The fields plus the derived figures (read back by from_dict, which ignores the derived ones)."""
        derived = {"perplexity_change": self.perplexity_change, "cache_fraction": self.cache_fraction,
                   "passkey_accuracy_original": self.passkey_accuracy("original"),
                   "passkey_accuracy_candidate": self.passkey_accuracy("candidate")}
        return {**dataclasses.asdict(self), **derived}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, data: Mapping) -> QualityReport:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["passkey"] = [PasskeyResult(**r) for r in kwargs.get("passkey", [])]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> QualityReport:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))


# -- held-out text -----------------------------------------------------------------------------------------


def vocab_limit(model: GemmaTPAModel, tokenizer) -> int:
    """Logits past the tokenizer's vocabulary (Gemma pads its embedding table) are never compared or produced."""
    return min(model.config.vocab_size, getattr(tokenizer, "vocab_size", model.config.vocab_size))


def eval_sequences(tokenizer, docs: Iterable[str], num_tokens: int, seq_len: int) -> list[list[int]]:
    """One sequence of seq_len tokens from the start of each document long enough, until about num_tokens
    tokens are predicted: many documents rather than one, so no single topic decides the figure."""
    count = max(1, round(num_tokens / max(1, seq_len - 1)))
    sequences = []
    for text in docs:
        ids = tokenizer.encode(text[: seq_len * 16], add_bos=True)
        if len(ids) >= seq_len:
            sequences.append(ids[:seq_len])
        if len(sequences) == count:
            break
    if not sequences:
        raise ValueError(f"no evaluation document has {seq_len} tokens")
    return sequences


@torch.no_grad()
def _logits(model: GemmaTPAModel, ids: Sequence[int], vocab: int) -> torch.Tensor:
    """Next-token logits [len(ids) - 1, vocab] on the CPU, in float32."""
    return model(torch.tensor([list(ids)], device=model.device))[0, :-1, :vocab].float().cpu()


def _kl_stats(logits_p: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor,
              chunk: int = 64) -> torch.Tensor:
    """[nll original, nll candidate, KL sum, top-1 agreements] summed over positions, in float64 and a few rows
    at a time (a 262k vocabulary at 512 positions is a gigabyte per float64 copy)."""
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, logits_p.shape[0], chunk):
        rows = slice(start, start + chunk)
        logp = F.log_softmax(logits_p[rows].double(), -1)
        logq = F.log_softmax(logits_q[rows].double(), -1)
        t = targets[rows, None]
        totals += torch.stack([-logp.gather(-1, t).sum(), -logq.gather(-1, t).sum(),
                               (logp.exp() * (logp - logq)).sum(), (logp.argmax(-1) == logq.argmax(-1)).sum()])
    return totals


def next_token_metrics(original, candidate, sequences: Sequence[Sequence[int]], vocab: int) -> dict[str, float]:
    """Perplexities, mean KL(original || candidate) and top-1 agreement over every next-token prediction."""
    totals = torch.zeros(4, dtype=torch.float64)
    count = 0
    for ids in sequences:
        logits_p = _logits(original, ids, vocab)
        logits_q = logits_p if candidate is original else _logits(candidate, ids, vocab)
        totals += _kl_stats(logits_p, logits_q, torch.tensor(ids[1:]))
        count += len(ids) - 1
    nll_p, nll_q, kl, agree = (float(t) / count for t in totals)
    return {"perplexity_original": math.exp(nll_p), "perplexity_candidate": math.exp(nll_q),
            "kl": max(kl, 0.0), "top1_agreement": agree, "eval_tokens": count}


# -- greedy continuations ----------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt as a one-turn chat, through the model's own template (raw text if it has none)."""
    out = []
    for text in prompts:
        try:
            out.append(list(tokenizer.encode_chat([{"role": "user", "content": text}])))
        except (ValueError, KeyError, TypeError):
            out.append(tokenizer.encode(text, add_bos=True))
    return out


def greedy_batches(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids=(), vocab=None,
                   batch_size: int = 8) -> list[list[int]]:
    """Greedy continuations of prompts of any lengths: equal lengths run together, in batches."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    outputs: list[list[int]] = [[] for _ in prompts]
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            results = generate(model, [prompts[i] for i in chunk], max_new_tokens, stop_token_ids=stop_ids,
                               vocab_limit=vocab)
            for i, out in zip(chunk, results):
                outputs[i] = out
    return outputs


def agreement(a: Sequence[int], b: Sequence[int]) -> tuple[int, int, int]:
    """(identical positions, compared positions, tokens before the first divergence) of two continuations;
    a position only one of them reached counts as a difference."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same, max(len(a), len(b)), prefix


def greedy_metrics(original, candidate, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> dict[str, float]:
    ids = chat_prompt_ids(tokenizer, prompts)
    stops, vocab = tuple(tokenizer.stop_token_ids), vocab_limit(original, tokenizer)
    outs_p = greedy_batches(original, ids, max_new_tokens, stops, vocab)
    outs_q = outs_p if candidate is original else greedy_batches(candidate, ids, max_new_tokens, stops, vocab)
    stats = [agreement(a, b) for a, b in zip(outs_p, outs_q)]
    compared = sum(s[1] for s in stats)
    return {"greedy_agreement": sum(s[0] for s in stats) / compared if compared else 1.0,
            "greedy_prefix": sum(s[2] for s in stats) / len(stats) if stats else 0.0}


# -- passkey retrieval -------------------------------------------------------------------------------------


@dataclass
class Passkey:
    """The pieces of a passkey prompt, tokenized once: haystack paragraphs and the fixed sentences."""

    tokenizer: object
    paragraphs: list[list[int]]
    intro: list[int]
    question: list[int]

    @classmethod
    def build(cls, tokenizer, docs: Iterable[str], min_tokens: int) -> Passkey:
        paragraphs, total = [], 0
        for text in docs:
            for para in text.split("\n\n"):
                paragraphs.append(tokenizer.encode("\n\n" + para))
                total += len(paragraphs[-1])
            if total >= min_tokens:
                break
        return cls(tokenizer, paragraphs, tokenizer.encode(PASSKEY_INTRO, add_bos=True),
                   tokenizer.encode("\n\n" + PASSKEY_QUESTION))

    def haystack(self, budget: int, start: int) -> list[list[int]]:
        """Paragraphs from `start` on (wrapping around) holding exactly budget tokens, the last one cut."""
        out, total, i = [], 0, start
        while total < budget:
            para = self.paragraphs[i % len(self.paragraphs)][: budget - total]
            out.append(para)
            total += len(para)
            i += 1
        return out

    def prompt(self, length: int, depth: float, key: int, start: int) -> list[int]:
        """A prompt of exactly `length` tokens with the key sentence between paragraphs at about `depth`."""
        sentence = self.tokenizer.encode("\n\n" + PASSKEY_SENTENCE.format(key=key))
        budget = length - len(self.intro) - len(sentence) - len(self.question)
        if budget < 1:
            raise ValueError(f"a passkey prompt needs more than {length} tokens")
        hay = self.haystack(budget, start)
        ends = [0]
        for para in hay:
            ends.append(ends[-1] + len(para))
        cut = min(range(len(ends)), key=lambda j: abs(ends[j] - depth * budget))
        flat = [t for para in hay for t in para]
        return self.intro + flat[: ends[cut]] + sentence + flat[ends[cut]:] + self.question


def make_passkey_trials(passkey: Passkey, length: int, depths: Sequence[float], keys_per_depth: int,
                   rng: random.Random) -> list[tuple[float, int, list[int]]]:
    """(depth, key, prompt) for every depth and a fresh random key and haystack start per trial."""
    trials = []
    for depth in depths:
        for _ in range(keys_per_depth):
            key = rng.randint(10_000, 99_999)
            trials.append((depth, key, passkey.prompt(length, depth, key, rng.randrange(len(passkey.paragraphs)))))
    return trials


def _passkey_hits(model, tokenizer, trials, batch_size: int) -> list[bool]:
    prompts = [t[2] for t in trials]
    answers = greedy_batches(model, prompts, PASSKEY_ANSWER_TOKENS, vocab=vocab_limit(model, tokenizer),
                             batch_size=batch_size)
    return [str(key) in tokenizer.decode(out) for (_, key, _), out in zip(trials, answers)]


def passkey_results(original, candidate, tokenizer, passkey: Passkey, lengths: Sequence[int],
                    depths: Sequence[float], keys_per_depth: int, seed: int = 0,
                    batch_size: int = 4) -> list[PasskeyResult]:
    """Retrieval accuracy of both models on the same prompts, per length and depth."""
    rng = random.Random(seed)
    results = []
    for length in lengths:
        trials = make_passkey_trials(passkey, length, depths, keys_per_depth, rng)
        hits_p = _passkey_hits(original, tokenizer, trials, batch_size)
        hits_q = hits_p if candidate is original else _passkey_hits(candidate, tokenizer, trials, batch_size)
        for depth in depths:
            rows = [i for i, t in enumerate(trials) if t[0] == depth]
            results.append(PasskeyResult(length, depth, len(rows), sum(hits_p[i] for i in rows),
                                         sum(hits_q[i] for i in rows)))
    return results


# -- per-layer sensitivity ---------------------------------------------------------------------------------


@torch.no_grad()
def _project(proj: FactorProjection, rank: int) -> None:
    """Replace a full-rank projection's heads by their projection on the top-`rank` weight-space head basis:
    the keys (values) a rank-`rank` layer computes, still stored as plain heads."""
    if proj.rank != proj.n_heads:
        raise ValueError(f"the layer stores rank {proj.rank} of {proj.n_heads}; sensitivity needs an exact original")
    W = proj.head_weights().double()
    U, _ = head_basis(head_covariance(W), rank)
    W = torch.einsum("gr,kr,kdh->gdh", U, U, W)
    proj.token_proj.weight.copy_(W.reshape(-1, W.shape[-1]))
    proj.head_basis.copy_(torch.eye(proj.n_heads))


def project_layer(k_rank: int, v_rank: int) -> Callable[[GemmaTPAModel, int], None]:
    """A reducer for layer_sensitivity: weight-space conversion of one layer to (k_rank, v_rank). The layer
    stays stored at full rank, so the model's config and cache are untouched while it computes exactly
    what the converted layer computes."""

    def reduce(model: GemmaTPAModel, layer: int) -> None:
        attn = model.layers[layer].attn
        _project(attn.k, k_rank)
        _project(attn.v, v_rank)

    return reduce


@torch.no_grad()
def layer_sensitivity(original: GemmaTPAModel, reduce_layer: Callable[[GemmaTPAModel, int], None],
                      sequences: Sequence[Sequence[int]], vocab: int | None = None) -> list[float]:
    """KL(original || original with only layer i reduced), per layer, mean per token. reduce_layer(model, i)
    changes layer i in place; the layer (and the config) are restored afterwards, so no copy of the whole
    model is ever made."""
    vocab = vocab or original.config.vocab_size
    reference = [_logits(original, ids, vocab) for ids in sequences]
    targets = [torch.tensor(ids[1:]) for ids in sequences]
    count = sum(len(t) for t in targets)
    kls = []
    for i in range(len(original.layers)):
        saved_layer, saved_config = copy.deepcopy(original.layers[i]), original.config
        try:
            reduce_layer(original, i)
            kl = sum(float(_kl_stats(p, _logits(original, ids, vocab), t)[2])
                     for p, ids, t in zip(reference, sequences, targets))
        finally:
            original.layers[i], original.config = saved_layer, saved_config
        kls.append(max(kl, 0.0) / count)
    return kls


# -- the report --------------------------------------------------------------------------------------------


def cache_bytes_per_token(config, session_len: int, dtype: torch.dtype,
                          cache_dtype: KVCacheDtype = AUTO) -> tuple[float, float]:
    """(this model's cache, stored as cache_dtype says, and a standard cache of the same model in dtype) in
    bytes per token of one session."""
    tpa = tpa_layout(config, dtype, cache_dtype=cache_dtype).session_bytes(session_len)
    standard = standard_layout(config, dtype).session_bytes(session_len)
    return tpa / session_len, standard / session_len


def _name(model: GemmaTPAModel) -> str:
    path = getattr(model, "source_path", None)
    return str(path) if path is not None else type(model).__name__


class _Stages:
    """Times each stage and says what runs, on stderr, so a long CPU run shows where it is."""

    def __init__(self, verbose: bool):
        self.verbose, self.timings = verbose, {}

    def run(self, name: str, fn, *args, **kwargs):
        if self.verbose:
            print(f"tpa-eval: {name}...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.timings[name] = time.perf_counter() - t0
        return result


def _check_pair(original: GemmaTPAModel, candidate: GemmaTPAModel) -> None:
    a, b = original.config, candidate.config
    if (a.vocab_size, a.num_hidden_layers, a.num_key_value_heads) != (b.vocab_size, b.num_hidden_layers,
                                                                      b.num_key_value_heads):
        raise ValueError("the candidate is not a conversion of the original: vocabulary, layers or kv heads differ")


def _cache_figures(original, candidate, session_len: int, dtype: torch.dtype) -> dict:
    orig, standard = cache_bytes_per_token(original.config, session_len, dtype, original.kv_cache_dtype)
    cand, _ = cache_bytes_per_token(candidate.config, session_len, dtype, candidate.kv_cache_dtype)
    return {"session_len": session_len, "cache_dtype": str(dtype).removeprefix("torch."),
            "bytes_per_token_original": orig, "bytes_per_token_candidate": cand, "bytes_per_token_standard": standard}


def _describe(original, candidate, text_source: str) -> dict:
    cfg = candidate.config
    return {"original": _name(original), "candidate": _name(candidate), "kv_heads": cfg.num_key_value_heads,
            "k_rank": cfg.k_rank, "v_rank": cfg.v_rank, "text_source": text_source,
            "kv_cache_dtype": candidate.kv_cache_dtype.name()}


def _eval_documents(documents: Sequence[str] | None, text_source: str | None) -> tuple[list[str], str]:
    """The given documents, or the evaluation side of tpa_model.evaluation.texts (fetched on first use)."""
    if documents is not None:
        return list(documents), text_source or "given documents"
    from . import texts

    return list(texts.documents("eval").values()), texts.source_name()


def evaluate(
    original: GemmaTPAModel,
    candidate: GemmaTPAModel,
    tokenizer,
    *,
    eval_tokens: int = 4096,
    seq_len: int = 512,
    chat_prompts: int = 16,
    greedy_tokens: int = 32,
    passkey_lengths: Sequence[int] = (512, 1024),
    passkey_depths: Sequence[float] = DEFAULT_DEPTHS,
    passkey_trials: int = 5,
    reduce_layer: Callable[[GemmaTPAModel, int], None] | None = None,
    layer_tokens: int = 1024,
    session_len: int | None = None,
    cache_dtype: torch.dtype = torch.bfloat16,
    documents: Sequence[str] | None = None,
    text_source: str | None = None,
    seed: int = 0,
    verbose: bool = False,
) -> QualityReport:
    """Measure `candidate` (a converted or healed model) against `original` on held-out text.

    documents default to the evaluation side of evaluation.texts. The first chat_prompts of CHAT_PROMPTS (32 at
    most) are continued for greedy_tokens tokens. passkey_trials keys are tried at each passkey length and
    depth; lengths beyond the model's context are dropped. With reduce_layer (e.g. project_layer(k, v)) the
    report also holds each layer's sensitivity, measured on about layer_tokens tokens. The cache bytes per
    token are read at session_len (default: the context, at most 32768).
    """
    _check_pair(original, candidate)
    documents, text_source = _eval_documents(documents, text_source)
    context = original.config.max_position_embeddings
    seq_len = min(seq_len, context, max(2, eval_tokens + 1))
    stages, vocab = _Stages(verbose), vocab_limit(original, tokenizer)
    sequences = eval_sequences(tokenizer, documents, eval_tokens, seq_len)
    figures = stages.run("perplexity and KL", next_token_metrics, original, candidate, sequences, vocab)
    prompts = CHAT_PROMPTS[:chat_prompts]
    figures |= stages.run("greedy continuations", greedy_metrics, original, candidate, tokenizer, prompts,
                          greedy_tokens)
    lengths = [n for n in passkey_lengths if n + PASSKEY_ANSWER_TOKENS <= context]
    figures["passkey"] = stages.run("passkey retrieval", passkey_results, original, candidate, tokenizer,
                                    Passkey.build(tokenizer, documents, 4 * max(lengths, default=0)), lengths,
                                    passkey_depths, passkey_trials, seed)
    if reduce_layer is not None:
        few = sequences[: max(1, round(layer_tokens / (seq_len - 1)))]
        figures["layer_kl"] = stages.run("per-layer sensitivity", layer_sensitivity, original, reduce_layer, few,
                                         vocab)
    figures |= _cache_figures(original, candidate, session_len or min(context, 32_768), cache_dtype)
    return QualityReport(**_describe(original, candidate, text_source), eval_sequences=len(sequences),
                         chat_prompts=len(prompts), greedy_tokens=greedy_tokens, timings=stages.timings, **figures)


# -- the frontier ------------------------------------------------------------------------------------------

METRIC_LABELS = {
    "perplexity": "perplexity on held-out text",
    "perplexity_change": "relative perplexity change",
    "kl": "next-token KL(original || candidate), nats/token",
    "top1_agreement": "top-1 agreement with the original",
    "greedy_agreement": "greedy-continuation agreement",
    "greedy_prefix": "tokens before the first greedy divergence",
    "passkey_accuracy": "passkey retrieval accuracy",
}


Point = tuple[float, float] | tuple[float, float, str]  # (cache fraction, quality[, label])


def frontier_points(reports: Iterable[QualityReport], metric: str = "kl", with_original: bool = True) -> list[Point]:
    """(cache fraction of a standard cache, metric, "k2 v1") per report, sorted by cache size; with_original
    adds the original itself (its own cache fraction, the metric of a model against itself)."""
    reports = list(reports)
    points = {(r.cache_fraction, r.metric(metric), point_label(r)) for r in reports}
    if with_original and reports:
        r = reports[0]
        same = {"perplexity": r.perplexity_original, "perplexity_change": 0.0, "kl": 0.0, "top1_agreement": 1.0,
                "greedy_agreement": 1.0, "greedy_prefix": float(r.greedy_tokens),
                "passkey_accuracy": r.passkey_accuracy("original")}
        points.add((r.bytes_per_token_original / r.bytes_per_token_standard, same[metric], "original"))
    return sorted(points)


def point_label(report: QualityReport) -> str:
    """"k2 v1", with the cache dtype when it is not the model's: "k2 v1 int8"."""
    label = f"k{report.k_rank} v{report.v_rank}"
    return label if report.kv_cache_dtype == "auto" else f"{label} {report.kv_cache_dtype}"


def plot_frontier(series: Mapping[str, Sequence[Point]], path: str | Path, *, metric: str = "kl",
                  title: str | None = None, log_y: bool = False) -> Path:
    """Draw one line per series of (cache fraction, quality[, label]) points to a PNG, with matplotlib's Agg
    canvas (no display, no global backend switch)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'gemma-tpa[eval]'") from e
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for p in points:
            if len(p) > 2:
                ax.annotate(p[2], (p[0], p[1]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KV cache per token, fraction of a standard cache")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title or "quality against cache size")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
