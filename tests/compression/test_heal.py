"""Healing (tpa_model.compression.heal) on a small random model: plumbing only, never a quality claim.

The demo checkpoint's weights are tiny (std 0.02), so its logits are nearly uniform and a rank-1 conversion
barely changes them; the `sharp` fixture re-draws its weights larger (as tests/conftest.py does for the tiny
Hugging Face checkpoints) so that the conversion costs a clearly measurable KL. It keeps the demo's tokenizer,
so healing reads the real calibration text.
"""

import json

import pytest
import torch

from tpa_model import load_model, save_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.compression.convert import make_heads_contextual
from tpa_model.compression.heal import (
    REPORT_FILE,
    STATE_FILE,
    distillation_kl,
    heal,
    token_windows,
    trainable_parameters,
    warmup_cosine,
)
from tpa_model.evaluation import texts
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

SEQ, BATCH = 64, 2
FAST = dict(seq_len=SEQ, batch_size=BATCH, progress=False)


def steps(n: int) -> int:
    return n * SEQ * BATCH


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """(checkpoint directory, tokenizer) of the demo model with larger random weights."""
    demo = resolve_model("demo")
    model = load_model(demo)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("vision_tower.", "multi_modal_projector.")) or name.endswith("head_basis"):
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.08))
    out = tmp_path_factory.mktemp("sharp")
    save_model(model, out, tokenizer_dir=demo)
    return out, load_tokenizer(out)


@pytest.fixture(scope="module")
def teacher(sharp):
    return load_model(sharp[0])


@pytest.fixture(scope="module")
def held_out(sharp):
    """Windows of evaluation text, which healing never reads."""
    docs = list(texts.documents("eval").values())[:8]
    return token_windows(sharp[1], docs, SEQ)[:8]


def rank1(sharp):
    return load_model(sharp[0], k_rank=1, v_rank=1)


@torch.no_grad()
def kl_on(teacher, student, ids) -> float:
    return float(distillation_kl(teacher(ids), student(ids)))


def test_gradients_pass_through_the_paged_cache(sharp):
    """model(input_ids) writes factors into the cache with index_copy_ and reads them back with gathers:
    the gradient that reaches the factor projections must be the true one (checked against central
    differences; the model is float64, but the reference backend scores in float32, hence the large step)."""
    teacher = load_model(sharp[0], dtype=torch.float64)
    student = load_model(sharp[0], k_rank=1, v_rank=1, dtype=torch.float64)
    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = teacher(ids)
    params = trainable_parameters(student)
    student.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    distillation_kl(target, student(ids)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values())
    assert all(float(p.grad.abs().max()) > 0 for n, p in params.items() if "token_proj" in n or ".v." in n)
    probes = [("layers.5.attn.k.token_proj.weight", (3, 7)), ("layers.0.attn.v.token_proj.weight", (5, 2)),
              ("layers.2.attn.v.head_basis", (1, 0))]
    for name, index in probes:
        p, eps = params[name], 1e-2
        with torch.no_grad():
            p[index] += eps
            up = distillation_kl(target, student(ids))
            p[index] -= 2 * eps
            down = distillation_kl(target, student(ids))
            p[index] += eps
        numeric = float(up - down) / (2 * eps)
        assert abs(float(p.grad[index]) - numeric) <= 1e-7 + 1e-2 * abs(numeric), name


def test_contextual_head_projection_trains(sharp, teacher):
    student = rank1(sharp)
    make_heads_contextual(student)
    names = list(trainable_parameters(student))
    assert any(n.endswith("attn.k.head_proj.weight") for n in names)
    heal(student, teacher, sharp[1], token_budget=steps(2), lr=1e-2, **FAST)
    assert float(student.layers[0].attn.v.head_proj.weight.detach().abs().max()) > 0  # it started at zero


def test_healing_lowers_held_out_kl_and_changes_only_the_factors(sharp, teacher, held_out):
    student = rank1(sharp)
    before_state = {n: t.clone() for n, t in student.state_dict().items()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    kl_before = kl_on(teacher, student, held_out)
    report = heal(student, teacher, sharp[1], token_budget=steps(30), lr=3e-3, log_every=5, **FAST)
    kl_after = kl_on(teacher, student, held_out)
    assert kl_after < 0.85 * kl_before, (kl_before, kl_after)
    assert report.steps == report.total_steps == 30 and report.tokens_seen == steps(30) and report.finished
    assert report.curve[-1][1] < report.curve[0][1] and len(report.curve) == 6
    changed = {n for n, t in student.state_dict().items() if not torch.equal(t, before_state[n])}
    trained = set(report.trainable)
    assert changed == trained and all(".attn.k." in n or ".attn.v." in n for n in trained)
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags
    with torch.no_grad():  # the teacher is untouched
        assert torch.equal(teacher(held_out[:1]), load_model(sharp[0])(held_out[:1]))


def test_train_attention_also_moves_queries_and_output(sharp, teacher):
    student = rank1(sharp)
    before = {n: t.clone() for n, t in student.state_dict().items()}
    report = heal(student, teacher, sharp[1], token_budget=steps(2), train="attention", lr=1e-3, **FAST)
    changed = {n for n, t in student.state_dict().items() if not torch.equal(t, before[n])}
    assert changed <= set(report.trainable)
    assert {"layers.3.attn.q_proj.weight", "layers.3.attn.q_norm.weight", "layers.3.attn.o_proj.weight",
            "layers.3.attn.v.token_proj.weight"} <= changed
    assert not any("mlp" in n or "embed" in n or "layernorm" in n for n in changed)


def test_resume_continues_exactly(sharp, teacher, tmp_path):
    settings = dict(token_budget=steps(9), lr=3e-3, log_every=2, **FAST)
    whole = rank1(sharp)
    full = heal(whole, teacher, sharp[1], **settings)

    parts = rank1(sharp)
    first = heal(parts, teacher, sharp[1], checkpoint_dir=tmp_path, checkpoint_every=2, max_steps=5, **settings)
    assert first.steps == 5 and not first.finished and first.after is None
    assert (tmp_path / STATE_FILE).is_file() and json.loads((tmp_path / REPORT_FILE).read_text())["steps"] == 5
    fresh = rank1(sharp)  # a new process would start from the converted model again
    second = heal(fresh, teacher, sharp[1], checkpoint_dir=tmp_path, **settings)
    assert second.resumed_at == 5 and second.steps == 9 and second.finished
    for (name, a), b in zip(whole.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert second.curve == full.curve
    again = heal(rank1(sharp), teacher, sharp[1], checkpoint_dir=tmp_path, **settings)  # finished: nothing to do
    assert again.steps == 9 and again.curve == full.curve
    with pytest.raises(ValueError, match="different healing run"):
        heal(rank1(sharp), teacher, sharp[1], checkpoint_dir=tmp_path, **{**settings, "lr": 1e-3})


def test_reads_the_calibration_split_only(sharp, teacher, monkeypatch):
    asked = []
    real = texts.documents

    def spy(split):
        asked.append(split)
        return real(split)

    monkeypatch.setattr(texts, "documents", spy)
    heal(rank1(sharp), teacher, sharp[1], token_budget=steps(1), **FAST)
    assert asked == ["calibration"]


def test_teacher_generated_sequences(sharp, teacher):
    report = heal(rank1(sharp), teacher, sharp[1], token_budget=steps(2), source="teacher", prompt_tokens=8, **FAST)
    assert report.steps == 2 and all(kl > 0 for _, kl in report.curve)


def test_eval_points_report_and_saved_model(sharp, teacher, held_out, tmp_path):
    student = rank1(sharp)
    seen = []

    def eval_fn(model):
        seen.append(torch.is_grad_enabled())
        return {"kl": kl_on(teacher, model, held_out[:2])}

    report = heal(student, teacher, sharp[1], token_budget=steps(6), lr=3e-3, eval_fn=eval_fn,
                  eval_at=[steps(2), steps(4)], **FAST)
    assert [(e.step, e.tokens) for e in report.evals] == [(0, 0), (2, steps(2)), (4, steps(4)), (6, steps(6))]
    assert report.before["kl"] > report.after["kl"] and seen == [False] * 4
    assert json.loads(json.dumps(report.to_dict()))["evals"][0]["result"] == report.before
    assert "step 6 of 6" in report.format()

    save_model(student, tmp_path / "healed", tokenizer_dir=sharp[0])
    loaded = load_model(tmp_path / "healed")
    with torch.no_grad():
        assert torch.equal(loaded(held_out[:2]), student(held_out[:2]))


def test_schedule_and_bad_arguments(sharp, teacher):
    f = warmup_cosine(2, 10, 0.1)
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0 and abs(f(10) - 0.1) < 1e-12 and f(6) < f(3)
    with pytest.raises(ValueError, match="separate"):
        heal(teacher, teacher, sharp[1], token_budget=10, **FAST)
    with pytest.raises(ValueError, match="train"):
        heal(rank1(sharp), teacher, sharp[1], token_budget=10, train="everything", **FAST)
    with pytest.raises(ValueError, match="source"):
        heal(rank1(sharp), teacher, sharp[1], token_budget=10, source="eval", **FAST)


def test_convert_heal_evaluate_cli(sharp, tmp_path, capsys):
    """tpa-convert --heal --evaluate: the harness runs before and after healing, and the checkpoint records
    the healing budget and the healed figures, which are better than the unhealed ones."""
    from tpa_model.cli import convert_main

    out = tmp_path / "healed"
    argv = ["--model", str(sharp[0]), "--out", str(out), "--k-rank", "1", "--v-rank", "1", "--contextual-heads",
            "--heal", "3.2k", "--heal-seq-len", str(SEQ), "--heal-batch-size", str(BATCH), "--heal-lr", "3e-3",
            "--evaluate", "--eval-tokens", "256"]
    assert convert_main(argv) == 0
    printed = capsys.readouterr().out
    assert "before healing:" in printed and "after healing:" in printed
    healed = load_model(out)
    assert healed.config.tpa.contextual_heads and healed.config.k_rank == 1
    healing, quality = healed.provenance["healing"], healed.provenance["quality"]
    assert healing["tokens"] == 3200 and healing["finished"] and healing["source"] == "calibration"
    state = json.loads((out / "healing" / REPORT_FILE).read_text())
    before = state["evals"][0]["result"]
    assert quality["kl"] < 0.9 * before["kl"]  # random weights: KL, not perplexity, is what healing targets
    assert quality["top1_agreement"] >= before["top1_agreement"]
