"""Structured outputs in the engine (server/engine/structured.py): whatever the random demo model prefers, each
sample of a constrained request is valid JSON under its schema, a match of its regular expression or one of its
choices, and stops there; a vocabulary read from a SentencePiece model spells what decode writes."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from server.engine.engine import EngineConfig, LLMEngine
from server.engine.structured import StructuredOutputError
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.sampling import ParamError, SamplingParams, StructuredOutput
from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

SCHEMA = {"type": "object",
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 999},
                         "tag": {"enum": ["a", "b"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
REGEX = r"(yes|no) [0-9]{2}"
CHOICES = ("red", "green", "blue")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("structured")
    build_demo(path)
    return path, GemmaTokenizer.from_dir(path)


def run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: list[int]) -> dict:
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished():
        done |= {out.request_id: out.outputs for out in engine.step() if out.finished}
    return done


@pytest.mark.parametrize("ranks", [None, 1], ids=["standard", "factors k1 v1"])
def test_every_sample_follows_its_constraint_and_stops_there(demo, ranks):
    path, tokenizer = demo
    engine = LLMEngine(load_model(path, k_rank=ranks, v_rank=ranks), tokenizer,
                       EngineConfig(max_model_len=256, cache_memory_gib=0.05))
    sampled = dict(n=3, max_tokens=60, temperature=1.0, seed=5)
    requests = {
        "schema": SamplingParams(**sampled, structured=StructuredOutput(json_schema=json.dumps(SCHEMA))),
        "regex": SamplingParams(**sampled, structured=StructuredOutput(regex=REGEX)),
        "choice": SamplingParams(**sampled, structured=StructuredOutput(choice=CHOICES)),
        "greedy": SamplingParams(max_tokens=60, temperature=0, structured=StructuredOutput(regex=REGEX)),
        "free": SamplingParams(max_tokens=6, temperature=0),  # beside them, unconstrained
    }
    done = run(engine, requests, tokenizer.encode("Tell me about caches.", add_bos=True))
    for out in done["schema"]:
        answer = json.loads(out.text)
        assert set(answer) == {"ok", "n", "tag"} and isinstance(answer["ok"], bool), out.text
        assert isinstance(answer["n"], int) and 0 <= answer["n"] <= 999 and answer["tag"] in ("a", "b"), out.text
        assert out.finish_reason == "stop"
    for out in done["regex"] + done["greedy"]:
        assert re.fullmatch(REGEX, out.text) and out.finish_reason == "stop", out.text
    assert {out.text for out in done["choice"]} <= set(CHOICES)
    assert all(out.finish_reason == "stop" for out in done["choice"])
    assert len({out.text for out in done["schema"]}) > 1  # three samples, not one answer forced three times
    free = done["free"][0]
    assert free.finish_reason == "length" and not re.fullmatch(REGEX, free.text)
    assert not engine.has_unfinished() and all(used == 0 for used, _ in engine.block_usage().values())


def test_a_constraint_that_cannot_compile_is_refused_before_anything_runs(demo):
    path, tokenizer = demo
    engine = LLMEngine(load_model(path), tokenizer, EngineConfig(max_model_len=64, cache_memory_gib=0.01))
    for spec, match in [(StructuredOutput(json_schema='{"type": "nonsense"}'), "nonsense"),
                        (StructuredOutput(json_schema="not json"), "expected"),
                        (StructuredOutput(regex="(unclosed"), "unclosed group")]:
        with pytest.raises(StructuredOutputError, match=match):
            engine.add_request("bad", [2, 5], SamplingParams(structured=spec))
    with pytest.raises(ParamError, match="exactly one of json_schema, regex and choice, got 2"):
        engine.add_request("bad", [2, 5], SamplingParams(structured=StructuredOutput(regex="a", choice=("a",))))
    assert not engine.requests and not engine.has_unfinished()


def test_without_llguidance_the_engine_runs_and_refuses_only_constraints(demo, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance fails from here on
    path, tokenizer = demo
    engine = LLMEngine(load_model(path), tokenizer, EngineConfig(max_model_len=64, cache_memory_gib=0.01))
    with pytest.raises(StructuredOutputError, match=r"need the llguidance package \(pip install llguidance\)"):
        engine.add_request("bad", [2, 5], SamplingParams(structured=StructuredOutput(regex="a+")))
    assert run(engine, {"plain": SamplingParams(max_tokens=3, temperature=0)}, [2, 5])["plain"][0].token_ids


def test_sentencepiece_vocabulary_bytes_spell_what_decode_writes(demo):
    _, tokenizer = demo
    tokens, special = tokenizer.token_bytes()
    assert len(tokens) == tokenizer.vocab_size
    assert {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.end_of_turn_id} <= special
    assert tokens[tokenizer.end_of_turn_id] == b"<end_of_turn>"
    spelled = b"".join(tokens[i] for i in tokenizer.encode("a\n\u00e9\u6f22"))  # byte pieces for the last two
    assert spelled.removeprefix(b" ") == "a\n\u00e9\u6f22".encode()
    gen = torch.Generator().manual_seed(0)
    # random non-ASCII byte pieces make broken UTF-8, which decode writes as U+FFFD: drawn apart from the rest
    ordinary = [i for i in range(tokenizer.vocab_size)
                if i not in special and not (len(tokens[i]) == 1 and tokens[i][0] >= 0x80)]
    assert len(ordinary) > 100
    for _ in range(50):
        ids = [ordinary[int(j)] for j in torch.randint(len(ordinary), (12,), generator=gen)]
        text = b"".join(tokens[i] for i in ids).decode()
        assert text.removeprefix(" ") == tokenizer.decode(ids).removeprefix(" ")  # decode drops the dummy prefix


def test_benchmark_runs_and_writes_its_table(tmp_path, capsys):
    """bench/structured.py, smallest cell on SmolLM2's real vocabulary: the table and the JSON it writes (this
    checks the script, it measures nothing)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench/structured.py"
    spec = importlib.util.spec_from_file_location("structured_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "structured.json"
    assert bench.main(["--models", "smollm2", "--batches", "2", "--steps", "3", "--rounds", "1",
                       "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "smollm2" and row["vocab"] == 49152 and row["batch"] == 2
    assert row["plain_ms"] > 0 and row["constrained_ms"] > 0 and row["first_compile_s"] > 0
    assert "smollm2" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_constraints_and_prompt_scores_on_cuda(demo):
    """On the GPU (bf16 weights and cache, the engine's CUDA defaults): constrained samples are valid, and a
    scored prompt has the logprobs of one whole bf16 forward, within bf16's rounding."""
    pytest.importorskip("llguidance", reason="llguidance is not installed on this GPU machine")
    path, tokenizer = demo
    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    engine = LLMEngine(model, tokenizer, EngineConfig(max_model_len=256, cache_memory_gib=0.05))
    prompt = tokenizer.encode("Tell me about caches. " * 4, add_bos=True)
    schema = StructuredOutput(json_schema=json.dumps(SCHEMA))
    requests = {
        "schema": SamplingParams(n=3, max_tokens=60, seed=5, structured=schema),
        "regex": SamplingParams(n=2, max_tokens=60, seed=6, structured=StructuredOutput(regex=REGEX)),
        "scored": SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2),
    }
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt, params)
    done = {}
    while engine.has_unfinished():
        done |= {out.request_id: out for out in engine.step() if out.finished}
    for out in done["schema"].outputs:
        assert set(json.loads(out.text)) == {"ok", "n", "tag"}, out.text
    assert all(re.fullmatch(REGEX, out.text) for out in done["regex"].outputs)
    with torch.no_grad():
        logp = torch.log_softmax(model.forward_sequences(torch.tensor([prompt], device="cuda"))[0].float(), dim=-1)
    expected = [logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert [lp for lp, _ in done["scored"].prompt_logprobs] == pytest.approx(expected, abs=0.1)
