"""Helpers for the tests that run a real server: tpa-serve's app on a loopback port in this process, tpa-serve
as a child process, a PNG as a data URL, and an engine step that fails on cue. Tests in any folder import them
(tests/ is on sys.path: the root conftest's folder)."""

import base64
import io
import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
from conftest import free_port
from PIL import Image

from server.cli import build_server, serve_parser, uvicorn_config

ROOT = Path(__file__).resolve().parents[1]
MODEL = "demo"  # the tiny random demo model (with a vision tower): fast, and it reads images


class LiveServer:
    """tpa-serve's app on a loopback port, in this process, with tpa-serve's uvicorn settings (timeouts); the
    demo model unless `model` says (None: the default model)."""

    def __init__(self, argv, model: str | None = "demo"):
        import uvicorn

        self.port = free_port()
        argv = [*(["--model", model] if model else []), "--log-level", "warning", *argv, "--port", str(self.port)]
        args = serve_parser().parse_args(argv)
        self.app, self.engine = build_server(args)
        self.server = uvicorn.Server(uvicorn_config(self.app, args))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def idle(self, timeout=10.0) -> bool:
        """No request in the engine and every cache block free."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.engine.stats()
            if s.num_running == 0 and s.num_waiting == 0 and all(u == 0 for u, _ in s.block_usage.values()):
                return True
            time.sleep(0.05)
        return False


def png_data_url(color=(200, 30, 30), size=(37, 21)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def spawn_tpa_serve(tmp_path, command: list[str], timeout: float = 90) -> tuple[subprocess.Popen, str]:
    """`command` (a tpa-serve invocation without --port) as a child process on a free port, returned with its
    URL once /health answers. The caller kills it if it is still running."""
    port = free_port()
    env = {**os.environ, "GEMMA_TPA_CACHE": os.environ.get("GEMMA_TPA_CACHE", str(tmp_path)),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline and proc.poll() is None, "tpa-serve did not come up"
        try:
            httpx.get(url + "/health")
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)


def fail_after(step, steps: int, message: str = "simulated device failure"):
    """`step` for the first `steps` calls, then a RuntimeError on every call: an engine fault mid-run."""
    calls = 0

    def failing_step():
        nonlocal calls
        calls += 1
        if calls > steps:
            raise RuntimeError(message)
        return step()

    return failing_step
