"""tpa-convert and tpa-generate end to end, on a tiny Hugging Face checkpoint with a real tokenizer."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import save_hf_causal

from server.cli import generate_main
from tpa_model import load_model
from tpa_model.cli import convert_main
from tpa_model.generation import generate
from tpa_model.sampling import SamplingParams
from tpa_model.tokenizers.gemma_tokenizer import DEMO_CORPUS, GemmaTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny HF checkpoint whose vocabulary is a SentencePiece model trained here."""
    path = tmp_path_factory.mktemp("hf_with_tokenizer")
    tok = GemmaTokenizer(train_sentencepiece(path / "tokenizer.model", DEMO_CORPUS, vocab_size=512))
    save_hf_causal(path, seed=5, vocab_size=tok.vocab_size)
    return path


def test_convert_then_generate(hf_dir, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(" ".join(DEMO_CORPUS))
    out = tmp_path / "tpa"
    assert convert_main(["--model", str(hf_dir), "--out", str(out), "--k-rank", "2", "--v-rank", "1",
                         "--calibration", str(calib), "--calibration-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "calibration text (64 tokens" in printed and "next-token KL" in printed and "nats/token" in printed
    assert (out / "tokenizer.model").is_file() and (out / "model.safetensors").is_file()
    model = load_model(out)
    assert (model.config.k_rank, model.config.v_rank) == (2, 1)

    assert generate_main(["--model", str(out), "--prompt", "Hello there", "--max-tokens", "5"]) == 0
    text = capsys.readouterr()
    assert "generated" in text.err and text.out.strip() != ""


def test_convert_reports_bad_model(tmp_path, capsys):
    assert convert_main(["--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "config.json: missing" in capsys.readouterr().err


@torch.no_grad()
def test_generate_matches_step_by_step_argmax(hf_dir):
    """Greedy generation through the cache equals re-running the full sequence each step."""
    model = load_model(hf_dir, k_rank=2, v_rank=2)
    prompts = [[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 23, 24]]
    outs = generate(model, prompts, max_new_tokens=12)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(prompt):]
    assert outs == [generate(model, [p], 12)[0] for p in prompts]  # batched equals alone


@torch.no_grad()
def test_seeded_sampling_is_reproducible_and_stops(hf_dir):
    model = load_model(hf_dir)
    prompt = [[2, 30, 31, 32]]
    a = generate(model, prompt, 20, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7))
    b = generate(model, prompt, 20, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7))
    assert a == b and len(a[0]) == 20
    stop = a[0][3]
    stopped = generate(model, prompt, 20, SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7), {stop})
    assert stopped[0] == a[0][: a[0].index(stop) + 1]


def test_installed_entry_point_runs_the_real_default_model():
    """With no --model, the console script continues text with Gemma 3 270M, a real base model; and start-up
    never imports torch._dynamo (2 s), which torch does for some operations on the meta device."""
    exe = shutil.which("tpa-generate")
    assert exe, "tpa-generate is not installed (pip install -e .)"
    result = subprocess.run([sys.executable, "-X", "importtime", exe, "--prompt",
                             "The Eiffel Tower is located in the city of", "--raw", "--max-tokens", "4",
                             "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemma-3-270m" in result.stderr and "Paris" in result.stdout
    assert "import time:" in result.stderr and "torch._dynamo" not in result.stderr


def test_demo_model_is_built_with_no_download(tmp_path):
    env = {**os.environ, "GEMMA_TPA_CACHE": str(tmp_path)}
    result = subprocess.run([shutil.which("tpa-generate"), "--model", "demo", "--prompt", "Why is the sky blue?",
                             "--max-tokens", "8", "--device", "cpu"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "generated" in result.stderr and "demo-v1" in result.stderr
    assert (tmp_path / "demo-v1" / "config.json").is_file()
    assert (tmp_path / "demo-v1" / "tokenizer.model").is_file()


def test_generate_with_image_on_demo_model(tmp_path, monkeypatch, capsys):
    from PIL import Image

    monkeypatch.setenv("GEMMA_TPA_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "red.png"
    Image.new("RGB", (90, 31), (200, 30, 30)).save(image)
    args = ["--model", "demo", "--prompt", "What is in this image?", "--image", str(image), "--max-tokens", "4",
            "--device", "cpu"]
    assert generate_main(args) == 0
    with_image = capsys.readouterr().err
    assert generate_main(args[:4] + args[6:]) == 0
    without = capsys.readouterr().err

    def prompt_tokens(err: str) -> int:
        return int(re.search(r"\[(\d+) prompt tokens", err).group(1))

    # 4 soft tokens per image in the demo model, wrapped in <start_of_image>/<end_of_image> and blank lines
    assert prompt_tokens(with_image) >= prompt_tokens(without) + 4 + 2

    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    assert generate_main([*args[:4], "--image", str(tmp_path / "bad.png")]) == 1
    assert "not an image" in capsys.readouterr().err


def test_image_on_text_only_model_is_refused(hf_dir, tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (20, 20)).save(image)
    assert generate_main(["--model", str(hf_dir), "--prompt", "hi", "--image", str(image)]) == 1
    assert "no vision tower" in capsys.readouterr().err


def test_converted_checkpoint_records_how_it_was_made_and_its_quality(tmp_path, monkeypatch, caplog):
    """tpa-convert --evaluate stores the method and the harness's figures; the engine logs them at start."""
    import json
    import logging

    from server.engine.llm import LLM

    monkeypatch.setenv("GEMMA_TPA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "rank1"
    assert convert_main(["--model", "demo", "--out", str(out), "--k-rank", "1", "--v-rank", "1", "--evaluate",
                         "--eval-tokens", "128", "--device", "cpu"]) == 0
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["conversion"]["method"] == "head basis per layer, weight-space"
    assert provenance["quality"]["kl"] > 0 and provenance["quality"]["eval_tokens"] > 0
    with caplog.at_level(logging.INFO, logger="gemma_tpa.engine"):
        LLM(out)
    assert any("quality: conversion: head basis per layer" in r.message and "perplexity" in r.message
               for r in caplog.records)
