"""bench/decode_step.py's cache-dtype axis: the random fill goes through the backend's write path (a quantized
cache holds the quantized copy of what the auto cache holds), and the script runs on tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpa_model.cache.quantization import dequantize, is_rotated, rotation

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def decode_step():
    spec = importlib.util.spec_from_file_location("bench_decode_step", ROOT / "bench" / "decode_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kv", ["int8", "fp8_e4m3", "int4", "int8/int4"])
@pytest.mark.parametrize("rank", [None, 2])
def test_quantized_fill_holds_the_auto_cache_quantized(decode_step, hf_causal, kv, rank):
    from tpa_model.checkpoints.loader import load_model

    model = load_model(hf_causal[0], **({} if rank is None else {"k_rank": rank, "v_rank": rank}))
    cache_dtype = decode_step.parse_kv(kv)
    auto = decode_step.OurStep(model, 2, 40)
    quant = decode_step.OurStep(model, 2, 40, cache_dtype=cache_dtype)
    for a, q in zip(auto.kv.layers, quant.kv.layers):
        assert q.spec.quantized and not a.spec.quantized
        for part in ("k", "v"):
            kind = q.spec.cache_dtype(part)
            stored_a, stored_q = a.stored(part), q.stored(part)
            assert stored_q[-1].dtype in (torch.int8, torch.uint8)
            if len(stored_a) == 2:  # head factors stay in the model's dtype, the same numbers
                assert torch.equal(stored_a[0], stored_q[0])
            back = dequantize(stored_q[-1], q.scale(part), kind, torch.float32)
            if is_rotated(kind):  # int4 rows are stored rotated: turned back, they are the auto cache's rows
                back = back @ rotation(back.shape[-1], back.device, torch.float32).T
            assert torch.isfinite(back).all()
            err = (back - stored_a[-1]).abs().max().item()
            assert err <= {"int8": 0.02, "fp8_e4m3": 0.15, "int4": 0.4}[kind] * stored_a[-1].abs().max().item()
    assert quant() > 0  # a step runs over the quantized cache


def test_script_runs_the_cache_dtype_axis(tmp_path):
    out = tmp_path / "decode_step.json"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "decode_step.py"), "--contexts", "48", "--batches", "2", "--ranks",
         "exact", "1", "--cache-dtypes", "int8", "int4", "int8/int4", "--rounds", "1", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x auto" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert set(row["vs_auto_cache"]) == {f"rank {r} {d}" for r in ("exact", "1") for d in ("int8", "int4", "int8/int4")}
    assert all(v["ratio_of_medians"] > 0 for v in row["vs_auto_cache"].values())
