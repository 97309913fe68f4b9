"""Per-request sampling: OpenAI-style parameters, penalties, logprobs and a batch-invariant seeded draw.

One `sample` call handles a whole batch of rows with mixed settings. The work that touches the vocabulary
(penalties, temperature, top-k/top-p masks, min-p, the draw itself) is batched tensor code; Python loops only
run over rows, never over tokens.

Reproducibility: a seeded request must draw the same tokens whether it runs alone or beside others, so each
seeded row fills its own noise from its own generator and is drawn with the Gumbel-max trick
(argmax(logits - log(E)), E ~ Exp(1)), which equals sampling from softmax(logits). Every mask is computed per
row from that row's own values, and each row's path (sort or not) depends only on its own parameters.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch

GREEDY_TEMPERATURE = 1e-5  # below this, temperature scaling would overflow; treat as argmax
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs
# repetition_penalty divides (or multiplies) logits: outside this range it makes them overflow to inf and NaN
# (1e-45 did), and no useful setting lies there (1.0-2.0 is the usual range).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MIN_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0: JSON has no -inf
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values: -100 bans a token, 100 all but forces it


class ParamError(ValueError):
    """A bad request parameter; `param` names the field so the HTTP layer can fill the OpenAI error's `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _require(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise ParamError(param, message)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on a sequence's text, exactly one of: JSON valid under `json_schema` (a JSON Schema as JSON
    text; '{"type": "object"}' for any object), a match of the regular expression `regex`, or one of `choice`.
    The engine enforces it token by token and stops the sequence when it is complete."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None


@dataclass
class SamplingParams:
    """The generation settings of one request, as an OpenAI-compatible API accepts them."""

    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the model length; 0 = the prompt only (to score it)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0 = the chosen token's logprob plus the top k alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    prompt_logprobs: int | None = None  # None = off; k >= 0 = each prompt token's logprob plus the top k
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # the API accepts a single string as well as a list
            self.stop = [self.stop]

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def validate(self) -> None:
        """Raise ParamError naming the first field outside its allowed range. Written so NaN fails too."""
        _require(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        _require(0 <= self.temperature <= 2, "temperature",
                 f"temperature must be between 0 and 2, got {self.temperature}")
        _require(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k in (-1, 0) or self.top_k >= 1, "top_k",
                 f"top_k must be -1 or 0 (disabled) or at least 1, got {self.top_k}")
        _require(0 <= self.min_p <= 1, "min_p", f"min_p must be between 0 and 1, got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(-2 <= value <= 2, name, f"{name} must be between -2 and 2, got {value}")
        _require(MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
                 f"repetition_penalty must be between {MIN_REPETITION_PENALTY} and {MAX_REPETITION_PENALTY}, "
                 f"got {self.repetition_penalty}")
        if self.seed is not None:
            _require(-(2**63) <= self.seed < 2**63, "seed", f"seed must be a 64-bit signed integer, got {self.seed}")
        if self.max_tokens is not None:
            _require(self.max_tokens >= 0, "max_tokens", f"max_tokens must be at least 0, got {self.max_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _require(0 <= value <= MAX_LOGPROBS, name, f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}")
        _require(len(self.stop) <= MAX_STOP_SEQUENCES, "stop",
                 f"stop may contain at most {MAX_STOP_SEQUENCES} sequences, got {len(self.stop)}")
        for s in self.stop:
            _require(isinstance(s, str) and len(s) > 0, "stop", f"stop sequences must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _require(t >= 0, "stop_token_ids", f"stop_token_ids must be non-negative token ids, got {t}")
        if self.structured is not None:
            given = [x for x in (self.structured.json_schema, self.structured.regex, self.structured.choice)
                     if x is not None]
            _require(len(given) == 1, "structured", "a structured output has exactly one of json_schema, regex and "
                     f"choice, got {len(given)}")
            _require(self.structured.choice is None or len(self.structured.choice) > 0, "structured",
                     "a structured output's choice lists at least one string")
        for t, bias in self.logit_bias.items():
            _require(t >= 0, "logit_bias", f"logit_bias keys must be non-negative token ids, got {t}")
            _require(-MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                     f"logit_bias values must be between {-MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}, got {bias} "
                     f"for token {t}")


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # the chosen token's logprob, None where the row did not ask
    top_logprobs: list[list[tuple[int, float]] | None]  # top-k (token id, logprob), descending; None if not asked


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on the logits' device for a seeded request; None (the global RNG) when unseeded."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[R, V] float32: how often each token occurs in each row's list. One scatter, no padding."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    lengths = torch.tensor([len(t) for t in token_lists], dtype=torch.long, device=device)
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    if tokens.numel():
        rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
        counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    params: list[SamplingParams],
) -> torch.Tensor:
    """Repetition, frequency and presence penalties (vLLM / OpenAI semantics) on [B, V] float logits.

    repetition (HF/CTRL): tokens seen in the prompt or the output have positive logits divided by the penalty
    and negative ones multiplied. frequency: minus penalty * count in the output. presence: minus penalty if
    in the output. Returns a new tensor when any row is penalized (the input is never modified), else the input.
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[1]
    idx = _index(rows, device)
    x = logits[idx]
    out_counts = _counts([output_ids[i] for i in rows], vocab, device)
    in_output = out_counts > 0

    if any(params[i].repetition_penalty != 1 for i in rows):
        # Only rows that use the repetition penalty need their (possibly long) prompt scattered.
        prompts = [prompt_ids[i] if params[i].repetition_penalty != 1 else [] for i in rows]
        seen = (_counts(prompts, vocab, device) > 0) | in_output
        rep = _column([params[i].repetition_penalty for i in rows], device)
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)

    freq = _column([params[i].frequency_penalty for i in rows], device)
    presence = _column([params[i].presence_penalty for i in rows], device)
    x = x - freq * out_counts - presence * in_output.float()

    out = logits.clone()
    out[idx] = x
    return out


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Each row's logit_bias added to its logits ([B, V] float): one scatter for the batch. Returns a new tensor
    when any row has a bias (the input is never modified), else the input. A banned (-inf) token stays banned."""
    rows = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias.items()]
    if not rows:
        return logits
    row, token, bias = zip(*rows)
    device = logits.device
    return logits.index_put((_index(list(row), device), _index(list(token), device)),
                            torch.tensor(bias, dtype=logits.dtype, device=device), accumulate=True)


def _apply_top_k_top_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus of what is left.

    Only rows that use top-k or top-p are sorted. The nucleus is the smallest set, in descending probability,
    whose cumulative probability reaches top_p: a token is kept while the mass before it is below top_p, so the
    most likely token is always kept.
    """
    rows = [i for i, p in enumerate(params) if p.top_k > 0 or p.top_p < 1]
    if not rows:
        return x
    device, vocab = x.device, x.shape[1]
    idx = _index(rows, device)
    sub = x[idx]
    k = torch.tensor([min(params[i].top_k, vocab) if params[i].top_k > 0 else vocab for i in rows], device=device)
    top_p = _column([params[i].top_p for i in rows], device)

    sorted_x, order = sub.sort(dim=-1, descending=True, stable=True)
    keep = torch.arange(vocab, device=device).unsqueeze(0) < k.unsqueeze(1)
    probs = sorted_x.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep &= (mass_before < top_p) | (top_p >= 1)  # top_p == 1 must not drop a tail lost to rounding
    keep[:, 0] = True
    keep = torch.empty_like(keep).scatter_(1, order, keep)  # back to vocabulary order

    x[idx] = sub.masked_fill(~keep, float("-inf"))
    return x


def _apply_min_p(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Drop tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p) (no softmax needed)."""
    if not any(p.min_p > 0 for p in params):
        return x
    log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else float("-inf") for p in params], x.device)
    threshold = x.max(dim=-1, keepdim=True).values + log_min_p
    return x.masked_fill(x < threshold, float("-inf"))


def _draw(x: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Gumbel-max draw: argmax(x - log E), E ~ Exp(1), which samples from softmax(x).

    Seeded rows fill their own row of noise from their own generator, so a row's draw never depends on the
    rest of the batch; unseeded rows share one fill from the global RNG.
    """
    noise = torch.empty_like(x)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        idx = _index(unseeded, x.device)
        noise[idx] = torch.empty(len(unseeded), x.shape[1], device=x.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    # Clamp so a (rare) zero draw cannot turn a -inf logit into NaN, which argmax would pick.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (x - noise.log()).argmax(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor,
                   k: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Each row's logprob of its token, and its k likeliest (id, logprob), descending. A token of probability
    0 (masked: -inf) is reported as OpenAI does, as MIN_LOGPROB: JSON has no -inf."""
    lp = torch.log_softmax(logits.float(), dim=-1).nan_to_num(nan=MIN_LOGPROB, neginf=MIN_LOGPROB)
    lp = lp.clamp(min=MIN_LOGPROB)
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = lp.topk(min(k, lp.shape[1]), dim=-1)
    return chosen, [list(zip(ids, values)) for ids, values in zip(top_ids.tolist(), top_values.tolist())]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> SampleResult:
    """Choose the next token of each row of [B, V] logits.

    Order: penalties -> logit bias -> logprobs -> greedy argmax, or temperature -> top-k -> top-p -> min-p ->
    draw.

    Logprobs come from log_softmax of the penalized and biased logits, before temperature and the truncations:
    they describe the distribution the request asked for (as vLLM does by default), not the warped one the
    token was drawn from, so they stay finite and comparable across requests that sample differently.
    """
    logits = apply_logit_bias(apply_penalties(logits.float(), prompt_ids, output_ids, params), params)
    batch, device = logits.shape[0], logits.device
    tokens = torch.empty(batch, dtype=torch.long, device=device)

    greedy = [i for i, p in enumerate(params) if p.is_greedy]
    if greedy:
        idx = _index(greedy, device)
        tokens[idx] = logits[idx].argmax(dim=-1)

    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if sampled:
        idx = _index(sampled, device)
        rows = [params[i] for i in sampled]
        x = logits[idx] / _column([p.temperature for p in rows], device)
        x = _apply_top_k_top_p(x, rows)
        x = _apply_min_p(x, rows)
        tokens[idx] = _draw(x, [generators[i] for i in sampled])

    token_ids = tokens.tolist()
    chosen_lp: list[float | None] = [None] * batch
    top_lp: list[list[tuple[int, float]] | None] = [None] * batch
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        idx = _index(wanted, device)
        chosen, tops = token_logprobs(logits[idx], tokens[idx], max(params[i].logprobs for i in wanted))
        for j, i in enumerate(wanted):
            chosen_lp[i] = chosen[j]
            top_lp[i] = tops[j][:params[i].logprobs]
    return SampleResult(token_ids, chosen_lp, top_lp)
