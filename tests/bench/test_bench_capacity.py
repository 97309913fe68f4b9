"""bench/capacity.py's cache-dtype table: sizes from meta-allocated blocks, checked here against the bytes a
stored row should take (the script itself never uses a formula)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cache_dtype_table(tmp_path):
    out = tmp_path / "capacity.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "capacity.py"), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["cache_dtype_rows"]
    assert {r["model"] for r in rows} == {"1b", "4b", "12b", "27b"}
    for r in rows:
        cells = r["cells"]
        assert list(cells) == ["bf16", "int8", "fp8", "int4", "k8 v4"]
        bf16 = cells["bf16"]["bytes_per_token"]
        if r["cache"] == "standard":  # every stored number is quantized: d bytes + a float16 scale per row
            d = {"1b": 256, "4b": 256, "12b": 256, "27b": 128}[r["model"]]
            int8, int4 = (d + 2) / (2 * d), (d / 2 + 2 * d / 32) / (2 * d)
            assert abs(cells["int8"]["bytes_per_token"] - bf16 * int8) < 1e-6 * bf16
            assert abs(cells["int4"]["bytes_per_token"] - bf16 * int4) < 1e-6 * bf16
            assert abs(cells["k8 v4"]["bytes_per_token"] - bf16 * (int8 + int4) / 2) < 1e-6 * bf16
        assert cells["int8"]["bytes_per_token"] == cells["fp8"]["bytes_per_token"]
        sessions = [cells[k]["sessions"] for k in ("bf16", "k8 v4", "int4")]
        assert sessions == sorted(sessions) and cells["int8"]["sessions"] >= cells["bf16"]["sessions"]
