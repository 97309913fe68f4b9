"""Healing: distil a converted (lower-rank) model back towards its original.

Below full rank a conversion changes the model (DESIGN.md section 1): on SmolLM2 a weight-space rank-2 basis
multiplies perplexity by about 60. Conversion picks factors that reconstruct K and V; healing instead trains a
few of the student's parameters so that its next-token distributions match the original's, which is what
matters, as MHA2MLA, X-EcoMLA and CARE do after their low-rank retrofits.

* The teacher is the original model, frozen, in eval mode and without gradients; the student is the converted
  model (same architecture, lower ranks).
* The loss is the mean over every position of KL(teacher || student) on sequences of calibration text (the
  calibration side of `evaluation.texts`, never the eval side, so quality measured afterwards is on unseen text),
  cut into windows and shuffled with a fixed seed; or (`source="teacher"`) on sequences the teacher samples
  itself from short calibration prompts, which puts the student on the teacher's own distribution.
* Only the attention's factor projections train by default (`train="factors"`: token_proj, head_basis and the
  contextual head_proj where present, for K and V of every layer): the weights conversion changed. With
  `train="attention"` the queries and the output projection also move to meet the new keys and values.
* AdamW with linear warmup and cosine decay, gradient clipping, float32; a token budget; checkpoints from which
  a later call continues bit for bit; a report with the loss curve and, given an eval_fn, quality before,
  during and after.

The healed student is an ordinary TPA model: its structure is unchanged, so `save_model` writes it and
`load_model` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..model.decoder import GemmaTPAModel

TRAIN_MODES = ("factors", "attention")
SOURCES = ("calibration", "teacher")
STATE_FILE = "heal_state.pt"
REPORT_FILE = "heal_report.json"
DEFAULT_LR = 1e-3


# -- what trains -------------------------------------------------------------------------------------------


def _factor_parameters(proj: nn.Module) -> list[nn.Parameter]:
    """A factor projection's trainable parts: the token projection, the head basis and, in T6's contextual
    form, the head projection (absent or None on a fixed-basis model)."""
    params = list(proj.token_proj.parameters()) + [proj.head_basis]
    head_proj = getattr(proj, "head_proj", None)
    if isinstance(head_proj, nn.Parameter):
        params.append(head_proj)
    elif isinstance(head_proj, nn.Module):
        params += list(head_proj.parameters())
    return params


def _query_output_parameters(attn: nn.Module) -> list[nn.Parameter]:
    """Queries (dense q_proj and q_norm, or the factored attn.q) and the output projection of one layer."""
    params = list(attn.o_proj.parameters())
    if getattr(attn, "q", None) is not None:
        return params + _factor_parameters(attn.q)
    params += list(attn.q_proj.parameters())
    if getattr(attn, "q_norm", None) is not None:
        params += list(attn.q_norm.parameters())
    return params


def trainable_parameters(model: GemmaTPAModel, train: str = "factors") -> dict[str, nn.Parameter]:
    """Name -> parameter of what `train` heals, in the model's own parameter order (so optimizer state lines
    up with names in a checkpoint)."""
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    chosen: set[int] = set()
    for layer in model.layers:
        attn = layer.attn
        chosen.update(id(p) for p in _factor_parameters(attn.k) + _factor_parameters(attn.v))
        if train == "attention":
            chosen.update(id(p) for p in _query_output_parameters(attn))
    return {name: p for name, p in model.named_parameters() if id(p) in chosen}


# -- data --------------------------------------------------------------------------------------------------


def calibration_documents() -> list[str]:
    """The calibration side of the held-out text split: healing never reads what quality is measured on."""
    from ..evaluation import texts

    return list(texts.documents("calibration").values())


def token_windows(tokenizer, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """[N, seq_len] windows of the documents' tokens, read as one stream: each window starts with the
    sequence start the model expects (bos where its tokenizer adds one, as at inference), then seq_len - 1
    (or seq_len) consecutive tokens of the stream."""
    prefix = tokenizer.encode("", add_bos=True)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after the sequence start")
    stream: list[int] = []
    for text in documents:
        stream += tokenizer.encode(text + "\n\n")
    count = len(stream) // body
    if count == 0:
        raise ValueError(f"the healing text has {len(stream)} tokens, fewer than one window of {seq_len}")
    chunks = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(count, len(prefix)), chunks], dim=1)


class WindowOrder:
    """Which window is the p-th one served: a fresh seeded permutation per pass over the windows, so the
    order is a function of (seed, p) alone and a resumed run reads exactly what an uninterrupted one would."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.count, generator=gen)
        return self._perm

    def take(self, position: int, n: int) -> list[int]:
        """The window indices served at positions [position, position + n)."""
        return [int(self._permutation(p // self.count)[p % self.count]) for p in range(position, position + n)]


@torch.no_grad()
def teacher_samples(teacher: GemmaTPAModel, prompts: torch.Tensor, seq_len: int, seed: int,
                    vocab: int) -> torch.Tensor:
    """[B, seq_len]: each prompt continued by the teacher, sampled at temperature 1 with a seed per row
    (stop tokens ignored, so every row is full length)."""
    from ..generation import generate
    from ..sampling import SamplingParams

    rows = prompts.tolist()
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=None)
    outs = generate(teacher, rows, seq_len - prompts.shape[1], params, vocab_limit=vocab)
    return torch.tensor([p + o for p, o in zip(rows, outs)], dtype=torch.long)


# -- the loss and the schedule -----------------------------------------------------------------------------


class _FusedKL(torch.autograd.Function):
    """Mean KL(teacher || student) over rows, with its gradient softmax(student) - softmax(teacher) computed in
    the same pass, a few rows at a time. The plain autograd version keeps several [positions, vocab] copies
    alive (two log-softmaxes, their difference, the product) and, on a CPU, spends more time allocating them
    than computing: at SmolLM2's 49k vocabulary and 1024 positions each copy is 200 MB (1 GB at Gemma's 262k)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
        dtype = torch.promote_types(student.dtype, torch.float32)
        z, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = z.shape[0]
        grad = torch.empty(z.shape, dtype=dtype, device=z.device)
        total = torch.zeros((), dtype=torch.float64, device=z.device)
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            logp = F.log_softmax(t[rows].to(dtype), dim=-1)
            logq = F.log_softmax(z[rows].to(dtype), dim=-1)
            p = logp.exp()
            total += (p * (logp - logq)).sum(dtype=torch.float64)
            torch.sub(logq.exp_(), p, out=grad[rows]).div_(n)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = student.shape, student.dtype
        return (total / n).to(dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.dtype).view(ctx.shape), None, None


def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) in nats, differentiable in the student's logits: the
    quantity quality.evaluate reports as `kl`, so the training curve and the held-out figure read the same
    way. Float32 at least (float64 stays float64); the teacher's logits get no gradient."""
    rows = max(1, (1 << 22) // student_logits.shape[-1])  # about 16 MB of float32 per temporary
    return _FusedKL.apply(student_logits, teacher_logits.detach(), rows)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then a cosine down to min_ratio at the last step. A pure function
    of the step, so the scheduler's state is just its step count."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- the report --------------------------------------------------------------------------------------------


@dataclass
class EvalPoint:
    tokens: int  # healing tokens seen when the evaluation ran
    step: int
    result: Any  # what eval_fn returned (restored from a checkpoint: its JSON form, see _jsonable)


@dataclass
class HealReport:
    token_budget: int
    seq_len: int
    batch_size: int
    lr: float
    train: str
    source: str
    total_steps: int
    trainable: list[str]  # names of the parameters that trained
    trainable_numel: int
    steps: int = 0  # optimizer steps taken so far (all calls together)
    tokens_seen: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens seen, mean KL over the last steps)
    evals: list[EvalPoint] = field(default_factory=list)
    train_seconds: float = 0.0  # time in training steps, all calls together (evaluations excluded)
    eval_seconds: float = 0.0
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update)
    finished: bool = False
    resumed_at: int | None = None  # the step this call resumed from, if it did

    @property
    def before(self) -> Any:
        """eval_fn's result on the unhealed student (None without eval_fn)."""
        return self.evals[0].result if self.evals and self.evals[0].step == 0 else None

    @property
    def after(self) -> Any:
        """eval_fn's result at the end of healing (None if healing has not finished)."""
        last = self.evals[-1] if self.evals else None
        return last.result if self.finished and last is not None and last.step == self.steps else None

    @property
    def seconds_per_1k_tokens(self) -> float:
        return 1000 * self.train_seconds / self.tokens_seen if self.tokens_seen else float("nan")

    def format(self) -> str:
        lines = [
            f"healing ({self.train}: {self.trainable_numel:,} parameters in {len(self.trainable)} tensors) on "
            f"{self.source} text: {self.tokens_seen:,} of {self.token_budget:,} tokens, step {self.steps} of "
            f"{self.total_steps} (batch {self.batch_size} x {self.seq_len}, peak lr {self.lr:g})"
            + ("" if self.finished else ", unfinished"),
            f"train {self.train_seconds:.0f} s ({self.seconds_per_1k_tokens:.2f} s per 1k tokens), "
            f"evaluation {self.eval_seconds:.0f} s" + (f", {self.skipped_steps} steps skipped" if self.skipped_steps
                                                       else ""),
        ]
        if self.curve:
            marks = sorted({0, len(self.curve) // 4, len(self.curve) // 2, 3 * len(self.curve) // 4,
                            len(self.curve) - 1})
            lines.append("KL(teacher || student) on healing text: "
                         + ", ".join(f"{self.curve[i][1]:.4f} @ {self.curve[i][0]:,}" for i in marks))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["evals"] = [{"tokens": e.tokens, "step": e.step, "result": _jsonable(e.result)} for e in self.evals]
        return data


def _jsonable(value: Any) -> Any:
    """An eval result in plain JSON types: a QualityReport (anything with to_dict), a dataclass, a mapping, a
    list or a number."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


# -- checkpoints -------------------------------------------------------------------------------------------


def _settings(report: HealReport, seed: int, extra: dict, params: dict[str, nn.Parameter]) -> dict:
    """What must match for a checkpoint to continue this run exactly."""
    return {"token_budget": report.token_budget, "seq_len": report.seq_len, "batch_size": report.batch_size,
            "lr": report.lr, "train": report.train, "source": report.source, "seed": seed, **extra,
            "parameters": [[name, list(p.shape)] for name, p in params.items()]}


def save_checkpoint(directory: Path, state: dict, report: HealReport) -> None:
    """The state (tensors and plain types only, so loading never unpickles code) and a readable report, each
    written to a temporary file and renamed over the old one: a crash mid-write leaves the last good copy."""
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / (STATE_FILE + ".partial")
    torch.save(state, partial)
    os.replace(partial, directory / STATE_FILE)
    text = json.dumps(report.to_dict(), indent=2)
    partial = directory / (REPORT_FILE + ".partial")
    partial.write_text(text + "\n", encoding="utf-8")
    os.replace(partial, directory / REPORT_FILE)


def load_checkpoint(directory: Path) -> dict | None:
    path = directory / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_settings(saved: dict, wanted: dict, directory: Path) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in wanted.items() if saved.get(k) != v]
    if diffs:
        raise ValueError(f"{directory / STATE_FILE} is from a different healing run ({'; '.join(diffs)}); "
                         "pass the same settings, resume=False, or another checkpoint_dir")


# -- the loop ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one heal() call works with, so the loop's helpers take one argument."""

    student: GemmaTPAModel
    teacher: GemmaTPAModel
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    windows: torch.Tensor
    order: WindowOrder
    report: HealReport
    settings: dict
    vocab: int
    seed: int
    prompt_tokens: int
    max_grad_norm: float
    pending: list[float] = field(default_factory=list)  # KL of the steps since the last curve point

    def batch(self, step: int) -> torch.Tensor:
        B = self.report.batch_size
        ids = self.windows[self.order.take(step * B, B)]
        if self.report.source == "teacher":
            ids = teacher_samples(self.teacher, ids[:, : self.prompt_tokens], self.report.seq_len,
                                  self.seed * 1_000_003 + step * B, self.vocab)
        return ids.to(self.student.device)

    def state(self) -> dict:
        return {"settings": self.settings, "step": self.report.steps,
                "data_position": self.report.steps * self.report.batch_size,
                "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), "pending": list(self.pending),
                "report": self.report.to_dict()}


def _train_step(run: _Run, ids: torch.Tensor) -> float | None:
    """One optimizer step on one batch; the KL before the update, or None when the loss or the gradient was
    not finite (the step is then skipped, the schedule still advances)."""
    with torch.no_grad():
        target = run.teacher(ids)[..., : run.vocab]
    with torch.enable_grad():
        loss = distillation_kl(target, run.student(ids)[..., : run.vocab])
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    norm = nn.utils.clip_grad_norm_(list(run.params.values()), run.max_grad_norm)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return float(loss.detach()) if finite else None


def _evaluate(run: _Run, eval_fn: Callable[[GemmaTPAModel], Any]) -> None:
    t0 = time.perf_counter()
    with torch.no_grad():
        result = eval_fn(run.student)
    run.report.evals.append(EvalPoint(run.report.tokens_seen, run.report.steps, result))
    run.report.eval_seconds += time.perf_counter() - t0


def _flush_curve(run: _Run) -> float | None:
    """Close the current curve point: the mean KL of the steps since the previous one."""
    if not run.pending:
        return None
    mean = sum(run.pending) / len(run.pending)
    run.report.curve.append((run.report.tokens_seen, mean))
    run.pending.clear()
    return mean


def _restore(run: _Run, state: dict) -> None:
    """Continue from a checkpoint: parameters, optimizer and scheduler state, RNG, curve and evaluations."""
    with torch.no_grad():
        for name, p in run.params.items():
            p.copy_(state["params"][name].to(p.device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    saved = state["report"]
    r = run.report
    r.steps, r.tokens_seen = state["step"], saved["tokens_seen"]
    r.curve = [tuple(point) for point in saved["curve"]]
    r.evals = [EvalPoint(e["tokens"], e["step"], e["result"]) for e in saved["evals"]]
    r.train_seconds, r.eval_seconds = saved["train_seconds"], saved["eval_seconds"]
    r.skipped_steps, r.finished = saved["skipped_steps"], saved["finished"]
    r.resumed_at = r.steps
    run.pending = list(state["pending"])


def _freeze(student: GemmaTPAModel, params: dict[str, nn.Parameter]) -> dict[str, bool]:
    """Only the chosen parameters require gradients (the rest then cost no weight gradients in backward);
    returns the flags to put back afterwards."""
    flags = {name: p.requires_grad for name, p in student.named_parameters()}
    chosen = {id(p) for p in params.values()}
    for p in student.parameters():
        p.requires_grad_(id(p) in chosen)
    return flags


def _check_models(student: GemmaTPAModel, teacher: GemmaTPAModel, params: dict[str, nn.Parameter]) -> None:
    if student is teacher:
        raise ValueError("the student must be a separate model from its teacher")
    a, b = teacher.config, student.config
    if (a.vocab_size, a.num_hidden_layers, a.num_key_value_heads) != (b.vocab_size, b.num_hidden_layers,
                                                                      b.num_key_value_heads):
        raise ValueError("the student is not a conversion of the teacher: vocabulary, layers or kv heads differ")
    wrong = sorted({str(p.dtype) for p in params.values() if p.dtype != torch.float32})
    if wrong:
        raise ValueError(f"healing trains in float32; the student's trainable weights are {', '.join(wrong)} "
                         "(load it with dtype=torch.float32)")


def _build_run(student, teacher, tokenizer, documents, *, token_budget, seq_len, batch_size, lr, train, source,
               seed, warmup, min_lr_ratio, weight_decay, max_grad_norm, prompt_tokens) -> _Run:
    from ..evaluation.quality import vocab_limit

    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "teacher" and not 0 < prompt_tokens < seq_len:
        raise ValueError(f"prompt_tokens must be between 1 and seq_len - 1, got {prompt_tokens}")
    if token_budget < 1 or seq_len < 2 or batch_size < 1:
        raise ValueError("token_budget, batch_size must be positive and seq_len at least 2")
    params = trainable_parameters(student, train)
    _check_models(student, teacher, params)
    total_steps = math.ceil(token_budget / (batch_size * seq_len))
    warmup_steps = max(1, round(warmup * total_steps))
    optimizer = torch.optim.AdamW(list(params.values()), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))
    report = HealReport(token_budget, seq_len, batch_size, lr, train, source, total_steps, list(params),
                        sum(p.numel() for p in params.values()))
    windows = token_windows(tokenizer, calibration_documents() if documents is None else documents, seq_len)
    extra = {"warmup": warmup, "min_lr_ratio": min_lr_ratio, "weight_decay": weight_decay,
             "max_grad_norm": max_grad_norm, "prompt_tokens": prompt_tokens if source == "teacher" else None,
             "windows": windows.shape[0]}
    return _Run(student, teacher, params, optimizer, scheduler, windows, WindowOrder(windows.shape[0], seed),
                report, _settings(report, seed, extra, params), vocab_limit(teacher, tokenizer), seed,
                prompt_tokens, max_grad_norm)


def _loop(run: _Run, *, max_steps, checkpoint_dir, checkpoint_every, eval_fn, eval_at, log_every, progress):
    """Train from run.report.steps to the end of the budget (or max_steps more), logging, evaluating and
    checkpointing on the way."""
    r = run.report
    tokens_per_step = r.batch_size * r.seq_len
    due = sorted({math.ceil(t / tokens_per_step) for t in eval_at if 0 < t < r.token_budget})
    stop = r.total_steps if max_steps is None else min(r.total_steps, r.steps + max_steps)
    bar = tqdm(total=r.total_steps * tokens_per_step, initial=r.tokens_seen, unit="tok", unit_scale=True,
               desc="healing", disable=not progress)
    try:
        while r.steps < stop:
            t0 = time.perf_counter()
            kl = _train_step(run, run.batch(r.steps))
            r.train_seconds += time.perf_counter() - t0
            r.steps += 1
            r.tokens_seen += tokens_per_step
            bar.update(tokens_per_step)
            if kl is None:
                r.skipped_steps += 1
            else:
                run.pending.append(kl)
            r.finished = r.steps == r.total_steps
            if len(run.pending) >= log_every or r.finished:
                mean = _flush_curve(run)
                if mean is not None:
                    bar.set_postfix(kl=f"{mean:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
            if eval_fn is not None and (r.steps in due or r.finished):
                _evaluate(run, eval_fn)
            if checkpoint_dir is not None and (r.steps % checkpoint_every == 0 or r.steps == stop):
                save_checkpoint(checkpoint_dir, run.state(), r)
    finally:
        bar.close()


def heal(
    student: GemmaTPAModel,
    teacher: GemmaTPAModel,
    tokenizer,
    *,
    token_budget: int,
    seq_len: int = 256,
    batch_size: int = 4,
    lr: float = DEFAULT_LR,
    train: str = "factors",
    source: str = "calibration",
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 50,
    resume: bool = True,
    progress: bool = True,
    log_every: int = 1,
    eval_fn: Callable[[GemmaTPAModel], Any] | None = None,
    eval_at: Sequence[int] = (),
    max_steps: int | None = None,
    documents: Sequence[str] | None = None,
    seed: int = 0,
    warmup: float = 0.05,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    prompt_tokens: int = 32,
) -> HealReport:
    """Distil `student` (a converted model) towards `teacher` (its original) in place; returns a HealReport.

    Trains on about token_budget tokens (ceil(token_budget / (batch_size * seq_len)) steps) of the calibration
    text (`documents` overrides it: never pass evaluation text), or with source="teacher" on continuations the
    teacher samples from its first prompt_tokens tokens. `train` is "factors" (K and V factor projections) or
    "attention" (also queries and the output projection); nothing else changes. The peak learning rate `lr`
    is reached after a `warmup` fraction of the steps and decays by a cosine to lr * min_lr_ratio.

    With checkpoint_dir, the state is saved every checkpoint_every steps and when the call stops; with resume,
    a call finds it there and continues exactly where it stopped (the same settings are required). max_steps
    bounds the steps of this call (the schedule still spans the whole budget), to split a run across sessions.

    eval_fn(student), e.g. a closure over quality.evaluate on held-out text, runs under no_grad before
    healing, when the tokens seen first reach each of eval_at, and at the end. The curve holds the mean
    training KL over every log_every steps. Parameters' requires_grad flags are restored on return.
    """
    if log_every < 1 or checkpoint_every < 1:
        raise ValueError("log_every and checkpoint_every must be at least 1")
    run = _build_run(student, teacher, tokenizer, documents, token_budget=token_budget, seq_len=seq_len,
                     batch_size=batch_size, lr=lr, train=train, source=source, seed=seed, warmup=warmup,
                     min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                     prompt_tokens=prompt_tokens)
    directory = None if checkpoint_dir is None else Path(checkpoint_dir)
    state = load_checkpoint(directory) if directory is not None and resume else None
    if state is not None:
        _check_settings(state["settings"], run.settings, directory)
        _restore(run, state)
    teacher.eval()
    student.eval()  # no dropout anywhere; eval mode keeps any future mode-dependent layer as at inference
    flags = _freeze(student, run.params)
    try:
        if eval_fn is not None and run.report.steps == 0:
            _evaluate(run, eval_fn)
        _loop(run, max_steps=max_steps, checkpoint_dir=directory, checkpoint_every=checkpoint_every,
              eval_fn=eval_fn, eval_at=eval_at, log_every=log_every, progress=progress)
    finally:
        for name, p in student.named_parameters():
            p.requires_grad_(flags[name])
    return run.report
