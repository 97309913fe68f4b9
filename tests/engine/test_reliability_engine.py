"""Reliability of the engine and the scheduler (docs/RELIABILITY.md, "Engine and scheduler" and "Start-up
flags"): nothing a client sends kills the engine, an error fails only its own request, what must never be
sampled is masked, the waiting queue counts samples, streams hold bounded memory, and tpa-serve refuses bad
flags before the model loads."""

import asyncio
import json
import os
import signal
import socket
import sys
import time

import httpx
import openai
import pytest
import torch
from live_server import MODEL, LiveServer, png_data_url, spawn_tpa_serve
from PIL import Image
from test_engine import finish

from server.cli import serve_main
from server.engine.async_engine import AsyncEngine, RequestFailedError, RequestStream
from server.engine.engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from tpa_model.checkpoints.demo import build_demo
from tpa_model.checkpoints.loader import load_model
from tpa_model.sampling import MIN_LOGPROB, SamplingParams, sample
from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

# -- the engine, in process ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("reliability_model")
    build_demo(path)
    return path


@pytest.fixture(scope="module")
def model(demo_dir):
    return load_model(demo_dir)


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return load_tokenizer(demo_dir)


def make_engine(model, tokenizer, tok=None) -> LLMEngine:
    return LLMEngine(model, tok or tokenizer, EngineConfig(block_size=4, num_blocks=128, max_num_seqs=16))


def image_prompt(engine, seed=0):
    image = Image.new("RGB", (30 + seed, 20), (seed * 40 % 255, 90, 200))
    inputs = engine.build_inputs([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                 [image])
    return inputs.token_ids, inputs.pixel_values


def greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, **kw)


def all_free(engine) -> bool:
    return not engine.requests and all(used == 0 for used, _ in engine.block_usage().values())


def force_token(engine, request_id, token):
    """Make every sampling row of `request_id` pick `token`, after the model and before the sampler."""
    real_run = engine.runner.run

    def run(chunks):
        out = real_run(chunks)
        for row, chunk in enumerate(out.sampling):
            if chunk.seq.request_id == request_id:
                out.logits[row, token] = 1e4
        return out

    engine.runner.run = run


def test_a_sampled_image_token_beside_an_image_prefill(model, tokenizer):
    """The original defect: a sequence that samples <image_soft_token> feeds it back in the step where another
    request's image is prefilled. The image's positions come from its own spans, so the step succeeds and
    the image request's tokens are those it makes alone."""
    alone = make_engine(model, tokenizer)
    ids, pixels = image_prompt(alone)
    alone.add_request("img", ids, greedy(6), pixels)
    expected = finish(alone)["img"].outputs[0].token_ids

    engine = make_engine(model, tokenizer)
    engine.never_sampled = torch.tensor([], dtype=torch.long)  # as before the mask: nothing kept it out
    engine.step_one_by_one = None  # the packed step itself must succeed, not its per-sequence retry
    force_token(engine, "text", model.image_token_id)
    engine.add_request("text", tokenizer.encode("hello", add_bos=True), greedy(6))
    engine.step()
    engine.add_request("img", ids, greedy(6), pixels)
    done = finish(engine)
    assert done["text"].error is None and model.image_token_id in done["text"].outputs[0].token_ids
    assert done["img"].error is None and done["img"].outputs[0].token_ids == expected
    assert all_free(engine)


def test_never_sampled_ids_are_masked(model, tokenizer):
    """The image soft token and pad are never drawn, however likely the model makes them."""
    engine = make_engine(model, tokenizer)
    masked = set(engine.never_sampled.tolist())
    assert {model.image_token_id, tokenizer.pad_id} <= masked and not masked & engine.eos_ids
    for token in (model.image_token_id, tokenizer.pad_id):
        force_token(engine, f"r{token}", token)
        engine.add_request(f"r{token}", tokenizer.encode("hello", add_bos=True),
                           SamplingParams(temperature=2.0, ignore_eos=True, max_tokens=8, n=4))
    for out in finish(engine).values():
        for c in out.outputs:
            assert not masked & set(c.token_ids)


class SmallerVocabulary:
    """The demo tokenizer, claiming 500 ids of the model's 512: rows 500-511 decode to nothing."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    vocab_size = 500


def test_ids_beyond_the_tokenizer_are_masked(model, tokenizer):
    engine = make_engine(model, tokenizer, SmallerVocabulary(tokenizer))
    assert set(range(500, 512)) <= set(engine.never_sampled.tolist())
    force_token(engine, "x", 505)
    engine.add_request("x", tokenizer.encode("hello", add_bos=True), greedy(5))
    assert max(finish(engine)["x"].outputs[0].token_ids) < 500


def fail_when(engine, bad_request: str, where: str = "run"):
    """Make the forward (or the logits) of any step that holds `bad_request` fail."""
    real_run = engine.runner.run

    def run(chunks):
        if where == "run" and any(c.seq.request_id == bad_request for c in chunks):
            raise RuntimeError("boom")
        out = real_run(chunks)
        for row, chunk in enumerate(out.sampling):
            if where == "nan" and chunk.seq.request_id == bad_request:
                out.logits[row, 3] = float("nan")
        return out

    engine.runner.run = run


@pytest.mark.parametrize("where", ["run", "nan"])
def test_a_failing_request_fails_alone(model, tokenizer, where):
    """A forward that raises, or logits that are NaN, end only the request they concern (finish_reason
    "error", `error` set, blocks freed); the others in the same steps finish as they would alone."""
    prompt = tokenizer.encode("a longer prompt about caches", add_bos=True)
    alone = make_engine(model, tokenizer)
    alone.add_request("good", prompt, greedy(8, n=2))
    expected = [c.token_ids for c in finish(alone)["good"].outputs]

    engine = make_engine(model, tokenizer)
    fail_when(engine, "bad", where)
    engine.add_request("good", prompt, greedy(8, n=2))
    engine.step()
    engine.add_request("bad", tokenizer.encode("hi", add_bos=True), greedy(8, n=3))
    done = finish(engine)
    assert isinstance(done["bad"].error, RuntimeError if where == "run" else FloatingPointError)
    assert [c.finish_reason for c in done["bad"].outputs] == ["error"] * 3
    assert done["good"].error is None and [c.token_ids for c in done["good"].outputs] == expected
    assert all_free(engine)


def test_a_failing_request_beside_an_image_prefill(model, tokenizer):
    """The one-by-one retry keeps each chunk's own image."""
    engine = make_engine(model, tokenizer)
    ids, pixels = image_prompt(engine)
    alone = make_engine(model, tokenizer)
    alone.add_request("img", ids, greedy(5), pixels)
    expected = finish(alone)["img"].outputs[0].token_ids
    fail_when(engine, "bad")
    engine.add_request("bad", tokenizer.encode("hi", add_bos=True), greedy(4))
    engine.add_request("img", ids, greedy(5), pixels)
    done = finish(engine)
    assert done["bad"].error is not None and done["img"].outputs[0].token_ids == expected
    assert all_free(engine)


def test_the_async_engine_goes_on_after_a_failed_request(model, tokenizer):
    engine = make_engine(model, tokenizer)
    fail_when(engine, "bad")

    async def main():
        ae = AsyncEngine(engine)
        ae.start()
        prompt = tokenizer.encode("hello", add_bos=True)
        with pytest.raises(RequestFailedError, match="RuntimeError"):
            async for _ in ae.generate(prompt, greedy(4), request_id="bad"):
                pass
        outs = [out async for out in ae.generate(prompt, greedy(4), request_id="good")]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        assert ae.is_alive
        await ae.shutdown()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_sampler_logprobs_are_finite():
    """JSON has no -inf or NaN: a token of probability 0 reports OpenAI's -9999.0."""
    logits = torch.full((1, 50), float("-inf"))
    logits[0, :3] = torch.tensor([2.0, 1.0, 0.5])
    result = sample(logits, [SamplingParams(temperature=0, logprobs=20)], [None], [[1]], [[]])
    values = [v for _, v in result.top_logprobs[0]]
    assert len(values) == 20 and all(v >= MIN_LOGPROB for v in values) and min(values) == MIN_LOGPROB
    json.dumps(values, allow_nan=False)


@pytest.mark.parametrize("value", [0.0, 1e-45, -1.0, 1e3, float("nan"), float("inf")])
def test_repetition_penalty_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value).validate()


# -- streams hold one output, however slow their reader --------------------------------------------------


class _Owner:
    def _forget(self, stream):
        pass


def output(step: int, finished=False) -> RequestOutput:
    tokens = list(range(step + 1))
    c = CompletionOutput(0, "x" * (step + 1), tokens, "length" if finished else None, delta_text="x",
                         delta_token_ids=[step], logprobs=[-1.0] * (step + 1), top_logprobs=[[]] * (step + 1))
    return RequestOutput("r", [1], [c], finished)


def test_an_unread_stream_holds_one_output():
    """1000 outputs put, none taken: the stream holds one, whose deltas are all 1000 joined."""

    async def main():
        stream = RequestStream(_Owner(), "r", [1], SamplingParams())
        for step in range(999):
            stream._put(output(step))
        stream._put(output(999, finished=True))
        assert len(stream._items) == 1
        outs = [out async for out in stream]
        assert len(outs) == 1 and outs[0].finished
        c = outs[0].outputs[0]
        assert c.delta_text == "x" * 1000 and c.delta_token_ids == list(range(1000)) and len(c.token_ids) == 1000

    asyncio.run(main())


# -- the server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    os.environ["GEMMA_TPA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    server = LiveServer(["--cache-memory", "0.05", "--max-num-seqs", "32", "--max-waiting", "40",
                         "--stream-timeout", "2"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_hot_text_samples_beside_image_requests(live, client):
    """The issue's reproduction: 32 text samples at temperature 2 beside image requests; every request
    succeeds and the engine stays up."""
    def text():
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "go"}], n=8,
                                              temperature=2.0, max_tokens=24, extra_body={"ignore_eos": True})

    def image(i):
        content = [{"type": "image_url", "image_url": {"url": png_data_url((i * 50 % 255, 9, 9))}},
                   {"type": "text", "text": "what?"}]
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=8)

    async def main():
        jobs = [asyncio.to_thread(text) for _ in range(4)] + [asyncio.to_thread(image, i) for i in range(6)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    assert all(c.finish_reason in ("length", "stop") for r in results for c in r.choices)
    assert httpx.get(live.url + "/health").status_code == 200 and live.idle()


@pytest.fixture
def failing_seed(live):
    """Requests with seed 666 make the forward raise; the others run normally."""
    engine = live.engine.engine
    real_run = engine.runner.run

    def run(chunks):
        if any(c.seq.params.seed == 666 for c in chunks):
            raise RuntimeError("boom")
        return real_run(chunks)

    engine.runner.run = run
    yield
    engine.runner.run = real_run


def test_a_failed_request_is_a_500_in_openais_shape(live, client, failing_seed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 666}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and set(error) >= {"message", "param"}
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, seed=666)
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=4).choices[0].finish_reason
    assert httpx.get(live.url + "/health").status_code == 200 and live.idle()


def test_a_failed_stream_ends_with_an_error_event(live, failing_seed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 666,
            "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert strict_json(events[-1])["error"]["code"] == "engine_error"
    assert httpx.get(live.url + "/health").status_code == 200 and live.idle()


def test_n_counts_against_the_waiting_limit(live, client):
    """--max-waiting 40: one request of n=41 (or 3 prompts x n=14) is a 503, as many requests would be."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "n": 41}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
    body = {"model": MODEL, "prompt": ["a", "b", "c"], "max_tokens": 2, "n": 14}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    assert len(client.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2, n=8).choices) == 16
    assert live.idle()


@pytest.mark.parametrize("value", [0, 1e-45, -1, 1000])
def test_bad_repetition_penalty_is_a_400(live, value):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "repetition_penalty": value, "logprobs": True}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "repetition_penalty"


def test_streamed_logprobs_are_valid_json(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "logprobs": True, "top_logprobs": 20, "repetition_penalty": 100, "temperature": 2}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(strict_json(e) for e in events[:-1])


def test_a_client_that_stops_reading_is_disconnected(live):
    """A stream whose client reads nothing: the server holds one output for it, and after --stream-timeout
    (2 s here) of blocked writes closes the connection and aborts the request."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                       "n": 8, "stream": True, "logprobs": True, "top_logprobs": 20, "ignore_eos": True}).encode()
    generated = live.engine.stats().num_generated_tokens
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
    sock.connect(("127.0.0.1", live.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        deadline = time.time() + 60
        most = 0
        while not live.engine._streams and time.time() < deadline:
            time.sleep(0.01)
        while live.engine._streams and time.time() < deadline:
            most = max([most] + [len(s._items) for s in list(live.engine._streams.values())])
            time.sleep(0.01)
        assert not live.engine._streams, "the stream was not closed"
        assert most <= 2  # one output (and at most the acceptance marker or the final output beside it)
        assert live.idle()
        assert live.engine.stats().num_generated_tokens - generated < 8 * 3000  # aborted, not finished
    finally:
        sock.close()


# -- start-up flags and process lifecycle ---------------------------------------------------------------


@pytest.mark.parametrize("flags", [
    ["--max-num-seqs", "0"], ["--max-num-batched-tokens", "0"], ["--max-waiting", "0"], ["--max-model-len", "0"],
    ["--cache-memory", "0"], ["--cache-memory", "nan"], ["--graceful-timeout", "-1"], ["--block-size", "0"],
    ["--max-num-seqs", "-3"], ["--port", "70000"], ["--stream-timeout", "0"], ["--log-level", "loud"],
    ["--served-model-name", " "], ["--device", "nonsense"], ["--gpu-memory-utilization", "0"],
    ["--gpu-memory-utilization", "1.5"], ["--gpu-memory-utilization", "nan"],
])
def test_bad_flags_are_refused_before_the_model_loads(flags, tmp_path, capsys):
    """A missing model directory would fail with status 1 once loading began: status 2 and argparse's
    one-line error mean the flag was refused first."""
    with pytest.raises(SystemExit) as info:
        serve_main(["--model", str(tmp_path / "missing"), *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("tpa-serve: error: ") and flags[0].lstrip("-").split("-")[0] in err[-1]


def test_a_port_in_use_is_refused_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as info:
            serve_main(["--model", str(tmp_path / "missing"), "--port", str(port)])
    assert info.value.code == 2
    assert f"tpa-serve: error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def start_serve(tmp_path, args, prelude=""):
    """tpa-serve on the demo model in a child process; `prelude` is Python run first (to plant a fault)."""
    code = f"import sys\n{prelude}\nfrom server.cli import serve_main\nsys.exit(serve_main(sys.argv[1:]))"
    return spawn_tpa_serve(tmp_path, [sys.executable, "-c", code, "--model", "demo", "--cache-memory", "0.02", *args])


def test_a_second_sigterm_exits_at_once(tmp_path):
    proc, url = start_serve(tmp_path, ["--graceful-timeout", "120"])
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert proc.poll() is None  # the first waits for the open stream
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()


DIE_ON_FIRST_STEP = """
from server.engine import scheduler
def broken(self):
    if self.waiting:
        raise RuntimeError("a scheduler bug")
    return []
scheduler.Scheduler.schedule = broken
"""


def test_an_engine_death_fails_requests_and_exits_non_zero(tmp_path):
    """If the engine loop dies anyway (here a scheduler bug), its requests get a 500 in OpenAI's shape and
    the process exits with status 1, so a supervisor restarts it."""
    proc, url = start_serve(tmp_path, [], prelude=DIE_ON_FIRST_STEP)
    try:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=30) == 1
        assert "the engine died" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
