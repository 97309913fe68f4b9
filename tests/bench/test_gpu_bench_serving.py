"""bench/gpu/serving_throughput.py: it refuses to run without CUDA (exit 2, saying why), and its --smoke run
(tiny models on the CPU) goes through every side: the factor and standard caches of our engine, whose decode
window must hold all of its sessions for every timed step, and transformers' static-cache generate."""

import importlib.util
import json
from pathlib import Path

import torch

PATH = Path(__file__).resolve().parents[2] / "bench/gpu/serving_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("serving_throughput_bench", PATH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_refuses_without_cuda_and_runs_its_smoke_check(capsys, tmp_path):
    bench = load_bench()
    if not torch.cuda.is_available():
        assert bench.main([]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "factor k1 v1" in table and "standard" in table and "transformers" in table and "target" in table
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["side"] in ("factor k1 v1", "standard")]
    assert len(ours) == 4  # two models, two sides
    for r in ours:
        assert r["window_steps"] == 2 and r["batch"] == min(r["engine_limit"], 4) and r["preemptions"] == 0
        assert r["decode_tok_s"] > 0 and r["other_decode_s"] == 0
    hf = [r for r in rows if r["side"] == "transformers" and "skipped" not in r]
    assert hf and hf[0]["decode_tok_s"] > 0


def test_prefill_lag_bounds_the_stagger_and_cells_fit_the_model():
    bench = load_bench()
    assert bench.prefill_lag(1, 32768, 8192) == 1
    assert bench.prefill_lag(65, 32768, 8192) == -(-64 * 32768 // 8128) + 1
    config = bench.preset("tiny")  # 4096 positions
    assert bench.cell_context(1024, config, 64) == 1024
    assert bench.cell_context(4096, config, 64) == 4032
    assert bench.cell_context(8192, config, 64) is None
