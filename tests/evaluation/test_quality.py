"""The quality harness on the built-in demo model (random weights: these tests check the plumbing and the
direction figures move in, never a quality claim), and the held-out text it reads.

The text is the real one, fetched from the Debian mirror on first use and cached ($GEMMA_TPA_CACHE/texts),
so CI exercises the fetch once per machine.
"""

import json

import pytest
import torch

from tpa_model import load_model
from tpa_model.checkpoints.named_models import resolve_model
from tpa_model.evaluation import texts
from tpa_model.evaluation.cli import main as eval_main
from tpa_model.evaluation.quality import (
    Passkey,
    QualityReport,
    agreement,
    evaluate,
    frontier_points,
    layer_sensitivity,
    plot_frontier,
    project_layer,
)
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

SMALL = dict(eval_tokens=192, seq_len=96, chat_prompts=3, greedy_tokens=6, passkey_lengths=(160,), passkey_trials=2,
             passkey_depths=(0.2, 0.8))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo():
    """(exact model, rank-1 conversion, tokenizer) of the demo checkpoint (2 kv heads)."""
    path = resolve_model("demo")
    return load_model(path), load_model(path, k_rank=1, v_rank=1), load_tokenizer(path)


@pytest.fixture(scope="module")
def self_report(demo):
    original, _, tok = demo
    return evaluate(original, original, tok, **SMALL)


@pytest.fixture(scope="module")
def rank1_report(demo):
    original, rank1, tok = demo
    return evaluate(original, rank1, tok, **SMALL, reduce_layer=project_layer(1, 1), layer_tokens=96)


def test_text_split_is_disjoint_and_deterministic():
    eval_docs, calib_docs = texts.documents("eval"), texts.documents("calibration")
    assert texts.corpus()["package"] == texts.PACKAGE and texts.corpus()["version"].startswith("3.11")
    assert set(eval_docs).isdisjoint(calib_docs)
    assert len(eval_docs) >= 50 and len(calib_docs) >= 4 * len(eval_docs) * 0.6
    assert sum(map(len, eval_docs.values())) > 500_000  # characters of prose on the evaluation side
    assert list(eval_docs) == [p for p in texts.split_files("eval") if p in eval_docs]  # a fixed order
    assert list(calib_docs) == texts.split_files("calibration")
    # the split is a function of the path alone (pinned, so it cannot drift between machines or versions)
    assert [texts.split_of(p) for p in ("library/functools", "library/os", "reference/datamodel")] == [
        "eval", "calibration", "calibration"]
    paragraphs = {p for text in eval_docs.values() for p in text.split("\n\n")}
    shared = paragraphs & {p for text in calib_docs.values() for p in text.split("\n\n")}
    assert not shared and len(paragraphs) > 5000


def test_rst_becomes_prose():
    rst = """\
.. _label:

A Title
=======

The :func:`~os.path.join` function joins *paths*; see :pep:`8` and ``x\\y`` for details::

    code = "dropped"

.. function:: spam(eggs)

   :noindex:

   Return the spam of eggs, as the `manual <https://example.org>`_ describes it.

.. code-block:: python

   print("also dropped, though it reads like a perfectly long English sentence.")

+------+------+
| a    | b    |
+------+------+

Too short.
"""
    assert texts.rst_to_paragraphs(rst) == [
        "The join function joins paths; see PEP 8 and x\\y for details:",
        "Return the spam of eggs, as the manual describes it.",
    ]


def test_fetch_without_apt_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(texts.shutil, "which", lambda tool: None)
    with pytest.raises(texts.TextsUnavailable, match="apt-get and dpkg-deb"):
        texts.fetch(tmp_path / "x.json")


def test_a_model_against_itself(self_report):
    r = self_report
    assert r.kl == 0 and r.top1_agreement == 1 and r.perplexity_change == 0
    assert r.greedy_agreement == 1 and r.greedy_prefix > 0
    assert all(p.original_correct == p.candidate_correct for p in r.passkey)
    assert [(p.length, p.depth, p.trials) for p in r.passkey] == [(160, 0.2, 2), (160, 0.8, 2)]
    assert r.cache_fraction == 1 and r.eval_tokens == 2 * 95 and 1 < r.perplexity_original < 1e4


def test_rank1_against_exact(rank1_report, self_report):
    r = rank1_report
    assert r.kl > 0 and r.top1_agreement < 1 and r.greedy_agreement < 1 and r.perplexity_change != 0
    assert r.perplexity_original == self_report.perplexity_original
    assert r.cache_fraction < 1 and r.bytes_per_token_original == r.bytes_per_token_standard
    assert len(r.layer_kl) == 6 and all(kl > 0 for kl in r.layer_kl)


@torch.no_grad()
def test_projected_layers_compute_the_converted_model(demo):
    """project_layer keeps a layer stored at full rank yet computes what the converted layer computes; the
    layers it changes for a sensitivity run are put back."""
    original, rank1 = load_model(resolve_model("demo")), demo[1]
    ids = torch.arange(2, 40)[None]
    before = original(ids)
    reduce = project_layer(1, 1)
    assert layer_sensitivity(original, lambda m, i: None, [ids[0].tolist()]) == [0.0] * 6
    layer_sensitivity(original, reduce, [ids[0].tolist()])
    assert torch.equal(original(ids), before)
    for i in range(len(original.layers)):
        reduce(original, i)
    torch.testing.assert_close(original(ids), rank1(ids), atol=1e-5, rtol=1e-4)


def test_agreement_counts_positions():
    assert agreement([1, 2, 3], [1, 2, 3]) == (3, 3, 3)
    assert agreement([1, 2, 3, 4], [1, 5, 3]) == (2, 4, 1)
    assert agreement([1, 2], [1, 2, 9]) == (2, 3, 2)  # one stopped early: a difference


def test_passkey_prompts_have_the_exact_length(demo):
    tok = demo[2]
    pk = Passkey.build(tok, texts.documents("eval").values(), 400)
    for depth in (0.0, 0.5, 1.0):
        ids = pk.prompt(200, depth, 12345, start=3)
        assert len(ids) == 200 and "12345" in tok.decode(ids)
    with pytest.raises(ValueError, match="needs more than"):
        pk.prompt(10, 0.5, 12345, start=0)


def test_report_json_round_trip_and_frontier_png(rank1_report, self_report, tmp_path):
    path = tmp_path / "r.json"
    rank1_report.to_json(path)
    assert QualityReport.from_json(path) == rank1_report
    data = json.loads(path.read_text())
    assert data["cache_fraction"] == rank1_report.cache_fraction and data["passkey"][0]["length"] == 160
    points = frontier_points([rank1_report], "kl")  # with the original itself at its own cache size
    assert points == [(rank1_report.cache_fraction, rank1_report.kl, "k1 v1"), (1.0, 0.0, "original")]
    assert [p[2] for p in frontier_points([self_report, rank1_report], "kl", with_original=False)] == ["k1 v1",
                                                                                                    "k2 v2"]
    png = plot_frontier({"weight-space": points, "other": [(0.5, 0.1)]}, tmp_path / "f.png", metric="kl")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_tpa_eval_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "report.json", tmp_path / "frontier.png"
    argv = ["--model", "demo", "--k-rank", "1", "--v-rank", "2", "--eval-tokens", "96", "--seq-len", "96",
            "--passkey-lengths", "128", "--passkey-trials", "1", "--chat-prompts", "2", "--greedy-tokens", "4",
            "--per-layer", "--json", str(out), "--png", str(png), "--png-metric", "kl"]
    assert eval_main(argv) == 0
    printed = capsys.readouterr().out
    assert "next-token KL" in printed and "passkey @ 128 tokens" in printed and "layer   5" in printed
    report = QualityReport.from_json(out)
    assert (report.k_rank, report.v_rank, report.kv_heads) == (1, 2, 2) and report.kl > 0
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_tpa_eval_reports_a_bad_candidate(tmp_path, capsys):
    assert eval_main(["--model", "demo", "--candidate", str(tmp_path), "--eval-tokens", "32"]) == 1
    assert "tpa-eval: error:" in capsys.readouterr().err
