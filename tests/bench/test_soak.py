"""The soak of bench/soak.py, short: 60 requests from 16 concurrent clients against tpa-serve run as a process
on the demo model (streamed and whole, with and without images, SDK and httpx, a third leaving early, some
slow readers, bursts over the waiting queue). Everything must be accounted for and nothing leaked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    import os

    spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module
    spec.loader.exec_module(module)
    os.environ.setdefault("GEMMA_TPA_CACHE", str(tmp_path_factory.mktemp("cache")))  # the server inherits it
    r = module.soak(requests=60, concurrency=16, seed=3, warmup=20)
    print(module.format_table(r))
    return r


@pytest.mark.parametrize("check", [
    "every request accounted for", "no errors", "some refused with 503", "some aborted by disconnect",
    "clients that stay are never aborted",
    "no running or waiting request", "every cache block free", "RSS within 10% of after warm-up", "server alive",
])
def test_short_soak(result, check):
    assert result["checks"][check], {k: result[k] for k in ("outcomes", "engine_after", "rss_mib_before",
                                                          "rss_mib_after", "errors")}


def test_short_soak_covered_every_kind_of_client(result):
    """Requests of every kind completed: streamed and whole, with and without images, through the SDK and
    httpx. (How many complete depends on the machine's speed: a slower server refuses more of the bursts.)"""
    assert sum(result["outcomes"].values()) == result["requests"] == 60
    assert min(result["streamed"], result["with_images"], result["through_sdk"], result["disconnecting"]) > 0
    completed = [set(k["kind"].split("/")) for k in result["by_kind"] if k["outcome"] == "completed"]
    for part in ("chat", "completion", "stream", "whole", "image", "text", "sdk", "httpx"):
        assert any(part in kind for kind in completed), f"no {part} request completed: {result['by_kind']}"
