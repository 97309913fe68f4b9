"""The OpenAI-compatible server, run for real: uvicorn on a loopback port, the official openai SDK as client."""

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer, fail_after, png_data_url, spawn_tpa_serve


@pytest.fixture(scope="module")
def live(tmp_path_factory):

    os.environ["GEMMA_TPA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    server = LiveServer(["--cache-memory", "0.05", "--max-num-seqs", "16"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def chat(client, content="Tell me about caches.", **kw):
    kw.setdefault("max_tokens", 8)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(live, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "gemma-tpa"
    assert httpx.get(live.url + "/health").status_code == 200


def test_completion(client):
    r = chat(client, temperature=0, extra_body={"ignore_eos": True})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8 and r.usage.prompt_tokens > 5


def test_streaming_matches_non_streamed(client):
    kw = dict(temperature=0.9, seed=11, max_tokens=12, extra_body={"ignore_eos": True})
    plain = chat(client, **kw)
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert text == plain.choices[0].message.content


def test_raw_sse_framing(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


def test_image_as_data_url(client):
    text_only = chat(client, content="What is this?", max_tokens=3)
    r = client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "text", "text": "What is this?"},
    ]}])
    # 4 soft tokens + <start_of_image>, <end_of_image> and the blank lines around them
    assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 4
    assert r.choices[0].message.content is not None


def test_streamed_n_choices_each_finish(client):
    chunks = list(chat(client, n=2, stream=True, max_tokens=5, temperature=1.0, seed=2,
                       extra_body={"ignore_eos": True}))
    finishes = [(c.choices[0].index, c.choices[0].finish_reason) for c in chunks
                if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_n_samples_and_seed(client):
    r = chat(client, n=2, temperature=1.0, seed=3, max_tokens=6, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1] and r.usage.completion_tokens == 12
    again = chat(client, n=2, temperature=1.0, seed=3, max_tokens=6, extra_body={"ignore_eos": True})
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]


def test_stop_string(client):
    kw = dict(temperature=0, max_tokens=16, extra_body={"ignore_eos": True})
    full = chat(client, **kw).choices[0].message.content
    stop = full[3:6]
    assert len(stop) == 3
    r = chat(client, stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_logprobs(client):
    r = chat(client, temperature=0, logprobs=True, top_logprobs=3, max_tokens=4, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob, abs=1e-5) for c in content)  # greedy


def test_logit_bias_forces_a_token_on_both_endpoints(client, live):
    """OpenAI's logit_bias, keys token ids as strings: +100 on one token makes greedy decoding write only that
    token, at a logprob of about 0."""
    tokenizer = live.engine.engine.tokenizer
    token = next(t for t in range(100, tokenizer.vocab_size) if tokenizer.decode([t, t]).strip())
    forced = tokenizer.decode([token] * 4)
    r = chat(client, temperature=0, max_tokens=4, logprobs=True, logit_bias={str(token): 100},
             extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == forced
    assert all(c.logprob > -1e-3 for c in r.choices[0].logprobs.content)
    r = client.completions.create(model=MODEL, prompt="Caches are", max_tokens=4, temperature=0,
                                  logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == forced
    plain = chat(client, temperature=0, max_tokens=4, extra_body={"ignore_eos": True})
    assert plain.choices[0].message.content != forced


def test_structured_outputs_through_the_sdk(client, live):
    """response_format with a JSON Schema (streamed and not) and vLLM's structured_outputs: the random demo
    model's text is valid under the constraint and the choice finishes with "stop"."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
              "required": ["ok", "n"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = chat(client, max_tokens=40, seed=1, response_format=fmt)
    answer = json.loads(r.choices[0].message.content)
    assert set(answer) == {"ok", "n"} and r.choices[0].finish_reason == "stop"
    chunks = list(chat(client, max_tokens=40, seed=2, response_format=fmt, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert set(json.loads(streamed)) == {"ok", "n"} and chunks[-1].choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=10, n=3, seed=3,
                                  extra_body={"structured_outputs": {"regex": "(cat|dog)[0-9]"}})
    assert all(re.fullmatch("(cat|dog)[0-9]", c.text) and c.finish_reason == "stop" for c in r.choices)
    assert live.idle()


def test_sdk_parse_with_a_pydantic_model(client):
    """The SDK's chat.completions.parse turns a pydantic model into a strict json_schema response_format and
    parses the answer back into the model: the constraint makes that work even for random weights."""
    from pydantic import BaseModel, Field

    class Answer(BaseModel):  # bounded, so that random weights finish it within max_tokens
        city: str = Field(max_length=12)
        population: int = Field(ge=0, le=10**9)
        capital: bool

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "A city?"}],
                                      response_format=Answer, max_tokens=80, seed=4)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Answer) and r.choices[0].finish_reason == "stop"
    assert len(parsed.city) <= 12 and 0 <= parsed.population <= 10**9


@pytest.mark.parametrize("bias,match", [
    ({"seven": 1}, "logit_bias keys must be token ids in decimal digits, got 'seven'"),
    ({"-3": 1}, "logit_bias keys must be token ids"),
    ({"12": 100.5}, "logit_bias values must be between -100 and 100, got 100.5 for token 12"),
    ({"99999999999": -1}, "logit_bias keys must be token ids below"),
])
def test_bad_logit_bias_is_400_naming_it(client, live, bias, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        chat(client, logit_bias=bias)
    assert info.value.body["param"] == "logit_bias"
    assert live.idle()


@pytest.mark.parametrize("kw,match", [
    (dict(max_tokens=100_000), "plus max_tokens \\(100000\\) is"),
    (dict(temperature=5.0), "temperature"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools is not supported"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     "response_format cannot be enforced: Invalid type: nonsense"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "needs json_schema.schema"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
     "response_format and guided_regex both constrain the output"),
    (dict(extra_body={"structured_outputs": {"regex": "a", "choice": ["a"]}}), "exactly one of json, regex"),
    (dict(n=0), "n"),
    (dict(max_tokens=0), "max_tokens must be at least 1, got 0"),
    (dict(n=1000), "n must be at most 128"),
])
def test_bad_requests_are_400(client, live, kw, match):
    with pytest.raises(openai.BadRequestError, match=match) as info:
        chat(client, **kw)
    body = info.value.body
    assert set(body) >= {"message", "type", "param", "code"}
    assert live.idle()


def test_tokenize_and_detokenize(live, client):
    """vLLM's /tokenize and /detokenize: a prompt's ids as /v1/completions makes them, a chat's as many as the
    chat endpoint counts, and ids back to text with special tokens written out."""
    tokenizer = live.engine.engine.tokenizer
    text = "Tell me about caches."

    def post(path, **body):
        return httpx.post(live.url + path, json={"model": MODEL, **body}, timeout=30)

    r = post("/tokenize", prompt=text).json()
    assert r["tokens"] == tokenizer.encode(text, add_bos=True) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == client.models.list().data[0].max_model_len
    assert post("/tokenize", prompt=text, add_special_tokens=False).json()["tokens"] == tokenizer.encode(text)
    messages = [{"role": "user", "content": text}]
    counted = post("/tokenize", messages=messages).json()["count"]
    assert counted == chat(client, text, max_tokens=1).usage.prompt_tokens
    assert post("/detokenize", tokens=r["tokens"]).json() == {"prompt": "<bos>" + text}
    for path, body, status, param in [("/tokenize", {"prompt": text, "messages": messages}, 400, "prompt"),
                                      ("/tokenize", {}, 400, "prompt"),
                                      ("/detokenize", {"tokens": [1, 10**7]}, 400, "tokens"),
                                      ("/tokenize", {"prompt": text, "model": "other"}, 404, "model")]:
        r = post(path, **body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)


def test_validation_error_names_the_field(live):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": MODEL, "messages": "nope"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages"


def test_bad_image_is_400(client):
    not_an_image = "data:image/png;base64," + base64.b64encode(b"x" * 50).decode()
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": not_an_image}},
        ]}])


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_api_key(tmp_path):
    server = LiveServer(["--cache-memory", "0.02", "--api-key", "s3cret"])
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            chat(bad)
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert chat(good).choices[0].message is not None
        assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    finally:
        server.stop()


def test_sixteen_concurrent_streams(live):
    async def one(client, i):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Story number {i}"}], max_tokens=10 + i,
            stream=True, extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    assert asyncio.run(main()) == [10 + i for i in range(16)]
    assert live.idle()


def test_disconnect_mid_stream_frees_everything(live):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on forever"}], "max_tokens": 3000,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: a collected line iterator closes the connection
        for _ in range(6):
            next(lines)
        assert live.engine.stats().num_running == 1
    assert live.idle(), "the aborted request still holds the engine or cache blocks"
    metrics = httpx.get(live.url + "/metrics").text
    assert "gemma_tpa_requests_running 0.0" in metrics
    assert "gemma_tpa_time_to_first_token_seconds_count" in metrics


def test_metrics_count_tokens(live, client):
    before = httpx.get(live.url + "/metrics").text
    chat(client, max_tokens=5, extra_body={"ignore_eos": True})
    after = httpx.get(live.url + "/metrics").text

    def value(text, name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    assert value(after, "gemma_tpa_generation_tokens_total") - value(before, "gemma_tpa_generation_tokens_total") == 5
    for name in ("gemma_tpa_cache_usage", "gemma_tpa_prefix_cache_hits_total", "gemma_tpa_preemptions_total",
                 "gemma_tpa_prompt_tokens_total", "gemma_tpa_inter_token_latency_seconds_count",
                 "gemma_tpa_e2e_request_latency_seconds_count", "gemma_tpa_queue_time_seconds_count",
                 "gemma_tpa_requests_waiting"):
        assert name in after


def dockerfile_entrypoint() -> list[str]:

    line = next(x for x in (Path(__file__).parents[2] / "Dockerfile").read_text().splitlines()
                if x.startswith("ENTRYPOINT"))
    return json.loads(line.removeprefix("ENTRYPOINT"))


def test_sigterm_lets_running_requests_finish(tmp_path):
    """The Dockerfile's entrypoint, run directly (on the demo model); SIGTERM stops accepting, the
    open stream completes, and the process exits 0."""
    entrypoint = dockerfile_entrypoint()
    assert entrypoint[0] == "tpa-serve"
    proc, url = spawn_tpa_serve(tmp_path, [shutil.which("tpa-serve"), *entrypoint[1:], "--model", "demo",
                                           "--cache-memory", "0.02"])
    try:
        assert httpx.get(url + "/health").status_code == 200
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in "".join(rest)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_full_queue_is_503_with_retry_after():
    """One seat and room for one waiting sequence: a long stream takes the seat, a second request waits, and a
    third finds the queue full."""
    server = LiveServer(["--cache-memory", "0.02", "--max-num-seqs", "1", "--max-waiting", "1"])
    chat_body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    waiting = {}
    try:
        long = {**chat_body, "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long, timeout=30) as stream:
            lines = stream.iter_lines()
            next(lines)
            second = threading.Thread(target=lambda: waiting.update(r=httpx.post(
                server.url + "/v1/chat/completions", json=chat_body, timeout=30)))
            second.start()
            deadline = time.time() + 10
            while server.engine.stats().num_waiting < 1:
                assert time.time() < deadline, "the second request never waited"
                time.sleep(0.01)
            r = httpx.post(server.url + "/v1/chat/completions", json=chat_body, timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        second.join(timeout=30)
        assert waiting["r"].status_code == 200  # the waiting one ran once the stream was gone
        assert server.idle()
    finally:
        server.stop()


def test_engine_death_mid_stream_is_an_error_event_and_health_503():
    server = LiveServer(["--cache-memory", "0.02"])
    try:
        engine = server.engine.engine
        engine.step = fail_after(engine.step, 3)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        last = json.loads(events[-1].removeprefix("data: "))
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()
