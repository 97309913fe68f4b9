"""POST /v1/completions, run for real: uvicorn on a loopback port, the official openai SDK as client, the demo
model (random weights: its text is noise, but greedy and seeded sampling are repeatable, which is all we need)."""

import json
import time

import httpx
import openai
import pytest
import torch
from live_server import LiveServer, fail_after

MODEL = "gemma-tpa-demo"
MAX_MODEL_LEN = 128
PROMPT = "The cache holds"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    import os

    os.environ.setdefault("GEMMA_TPA_CACHE", str(tmp_path_factory.mktemp("cache")))
    server = LiveServer(["--model", "demo", "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                         "--cache-memory", "0.05", "--max-num-seqs", "16"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def complete(client, prompt=PROMPT, **kw):
    kw.setdefault("max_tokens", 8)
    return client.completions.create(model=MODEL, prompt=prompt, **kw)


GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_completion(client):
    r = complete(client, **GREEDY)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert isinstance(choice.text, str) and choice.text
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert complete(client, **GREEDY).choices[0].text == choice.text  # greedy is repeatable


def test_prompt_is_raw_text_with_bos(live, client):
    """No chat template: the prompt's tokens are bos plus the text's own tokens."""
    tokenizer = live.app.state.serving_completion.tokenizer
    r = complete(client, max_tokens=1)
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT, add_bos=True))
    assert tokenizer.encode(PROMPT, add_bos=True)[0] == tokenizer.bos_id


def test_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw", [dict(GREEDY), dict(temperature=0.9, seed=11, max_tokens=12,
                                                   extra_body={"ignore_eos": True})])
def test_streaming_matches_non_streamed(client, kw):
    plain = complete(client, **kw)
    chunks = list(complete(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert text == plain.choices[0].text


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(complete(client, stream=True, max_tokens=4))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_raw_sse_framing(live):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        chunk = json.loads(event[6:])
        assert chunk["object"] == "text_completion"
        for choice in chunk["choices"]:
            assert set(choice) == {"index", "text", "logprobs", "finish_reason"}


def test_n_samples_and_seed(client):
    kw = dict(n=3, temperature=1.0, seed=3, max_tokens=6, extra_body={"ignore_eos": True})
    r = complete(client, **kw)
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 18
    assert [c.text for c in complete(client, **kw).choices] == [c.text for c in r.choices]


def test_streamed_n_choices_each_finish_and_match(client):
    kw = dict(n=2, temperature=1.0, seed=2, max_tokens=5, extra_body={"ignore_eos": True})
    plain = complete(client, **kw)
    chunks = list(complete(client, stream=True, **kw))
    texts, finishes = ["", ""], []
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes.append((choice.index, choice.finish_reason))
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert texts == [c.text for c in sorted(plain.choices, key=lambda c: c.index)]


def test_stop_string(client):
    full = complete(client, **GREEDY).choices[0].text
    stop = full[3:6]
    assert len(stop) == 3
    r = complete(client, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == full[: full.index(stop)]
    chunks = list(complete(client, stop=stop, stream=True, **GREEDY))  # a lone string, streamed
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def check_legacy_logprobs(lp, num_tokens, k):
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == num_tokens
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert isinstance(token, str) and logprob <= 0
        assert token in top and top[token] == pytest.approx(logprob, abs=1e-5)  # the sampled token is always there
        assert len(top) <= k + 1 and (k == 0 or len(top) >= k - 1)  # two ids may share a text
    offsets = [lp.text_offset[0] + sum(len(t) for t in lp.tokens[:i]) for i in range(num_tokens)]
    assert lp.text_offset == offsets


def test_logprobs_format(client):
    r = complete(client, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    check_legacy_logprobs(lp, 12, 3)
    assert lp.text_offset[0] == 0
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert logprob == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the likeliest
    zero = complete(client, logprobs=0, **GREEDY).choices[0].logprobs
    check_legacy_logprobs(zero, 12, 0)
    assert all(len(top) == 1 for top in zero.top_logprobs)


def test_streamed_logprobs_match(client):
    plain = complete(client, logprobs=2, **GREEDY).choices[0].logprobs
    chunks = list(complete(client, logprobs=2, stream=True, **GREEDY))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == plain.tokens
    assert sum((p.token_logprobs for p in parts), []) == pytest.approx(plain.token_logprobs, abs=1e-5)
    assert sum((p.text_offset for p in parts), []) == plain.text_offset  # offsets run on across chunks


def test_token_id_prompt(live, client):
    tokenizer = live.app.state.serving_completion.tokenizer
    ids = tokenizer.encode(PROMPT, add_bos=True)
    as_text = complete(client, **GREEDY)
    as_ids = complete(client, prompt=ids, **GREEDY)
    assert as_ids.usage.prompt_tokens == len(ids)
    assert as_ids.choices[0].text == as_text.choices[0].text
    no_bos = complete(client, prompt=ids[1:], max_tokens=1)  # ids are used as they are: no bos is added
    assert no_bos.usage.prompt_tokens == len(ids) - 1


def test_batch_of_prompts(live, client):
    tokenizer = live.app.state.serving_completion.tokenizer
    single = [complete(client, prompt=p, **GREEDY) for p in ("one", "two words")]
    r = complete(client, prompt=["one", "two words"], **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [s.choices[0].text for s in single]
    assert r.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert r.usage.completion_tokens == 24
    ids = [tokenizer.encode(p, add_bos=True) for p in ("one", "two words")]
    by_ids = complete(client, prompt=ids, n=2, **GREEDY)  # choice i of prompt p is p * n + i
    assert [c.index for c in by_ids.choices] == [0, 1, 2, 3]
    assert [c.text for c in by_ids.choices] == [single[0].choices[0].text] * 2 + [single[1].choices[0].text] * 2
    chunks = list(complete(client, prompt=["one", "two words"], stream=True, stream_options={"include_usage": True},
                           **GREEDY))
    texts = ["", ""]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in r.choices]
    assert chunks[-1].usage.model_dump() == r.usage.model_dump()
    assert live.idle()


def test_echo(live, client):
    plain = complete(client, **GREEDY).choices[0].text
    assert complete(client, echo=True, **GREEDY).choices[0].text == PROMPT + plain
    streamed = list(complete(client, echo=True, stream=True, **GREEDY))
    assert streamed[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain
    tokenizer = live.app.state.serving_completion.tokenizer
    by_ids = complete(client, prompt=tokenizer.encode(PROMPT, add_bos=True), echo=True, **GREEDY)
    assert by_ids.choices[0].text == PROMPT + plain  # the bos is a special token, skipped


def test_echo_with_logprobs_scores_the_prompt(live, client):
    """echo with logprobs, as evaluation harnesses ask for a text's loglikelihood (lm-evaluation-harness's
    completions API): every prompt token after the first has the model's logprob given the tokens before it and
    the top alternatives; the first has none; the generated token follows. Streamed: the same, in the opening."""
    tokenizer = live.app.state.serving_completion.tokenizer
    ids = tokenizer.encode("The cache holds the factors of every token in the sequence.", add_bos=True)
    model = live.engine.engine.model
    with torch.no_grad():
        logp = torch.log_softmax(model.forward_sequences(torch.tensor([ids]))[0].float(), dim=-1)
    r = complete(client, prompt=ids, echo=True, logprobs=2, max_tokens=1, temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) >= 2 for top in lp.top_logprobs[1:])
    assert lp.tokens[-1] == r.choices[0].text[len(r.choices[0].text) - len(lp.tokens[-1]):]  # the generated token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    streamed = list(complete(client, prompt=ids, echo=True, logprobs=2, max_tokens=1, temperature=0, stream=True))
    opening = streamed[0].choices[0]
    assert opening.text == r.choices[0].text[:len(opening.text)] and opening.logprobs.token_logprobs[0] is None
    assert opening.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert live.idle()


def test_max_tokens_0_with_echo_returns_the_scored_prompt_alone(live, client):
    """The scoring request of clients that measure loglikelihoods: the prompt back with its logprobs, no token
    generated; streamed too. Without echo, 0 is refused (see test_bad_requests_are_400)."""
    r = complete(client, echo=True, logprobs=1, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == r.usage.prompt_tokens and choice.logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    streamed = list(complete(client, echo=True, logprobs=1, max_tokens=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT
    assert streamed[0].choices[0].logprobs.token_logprobs == choice.logprobs.token_logprobs
    assert streamed[-1].choices[0].finish_reason == "length"
    assert live.idle()


def test_unknown_fields_are_ignored(live):
    r = httpx.post(live.url + "/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "no_such_option": {"x": 1}})
    assert r.status_code == 200 and r.json()["object"] == "text_completion"


def test_extras_through_extra_body(client):
    r = complete(client, max_tokens=6, extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2,
                                                   "ignore_eos": True, "stop_token_ids": [], "skip_special_tokens":
                                                   False}, presence_penalty=0.5, frequency_penalty=0.5, seed=1)
    assert r.usage.completion_tokens == 6


def test_stop_token_ids(live, client):
    """Every id a stop token: the first generated token ends the choice."""
    vocab = live.app.state.serving_completion.tokenizer.vocab_size
    r = complete(client, max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": list(range(vocab))})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def assert_openai_error(info, param=None, code=None):
    body = info.value.body
    assert set(body) >= {"message", "type", "param", "code"}
    if param is not None:
        assert body["param"] == param
    if code is not None:
        assert body["code"] == code


@pytest.mark.parametrize("kw,param,match", [
    (dict(max_tokens=MAX_MODEL_LEN), "max_tokens", "plus max_tokens \\(128\\) is"),
    (dict(prompt="word " * 200), "max_tokens", "more than the maximum model length"),
    (dict(temperature=5.0), "temperature", "temperature"),
    (dict(top_p=0.0), "top_p", "top_p"),
    (dict(n=0), "n", "n must be at least 1"),
    (dict(n=1000), "n", "n must be at most 128"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1"),
    (dict(logprobs=21), "logprobs", "logprobs must be between 0 and 20"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop", "at most 4"),
    (dict(presence_penalty=3), "presence_penalty", "presence_penalty"),
    (dict(suffix="and then"), "suffix", "suffix is not supported"),
    (dict(best_of=3, n=1), "best_of", "best_of greater than n is not supported"),
    (dict(best_of=1, n=2), "best_of", "best_of must be at least n"),
    (dict(prompt=[1, 2, 10**6]), "prompt", "prompt token ids must be integers"),
    (dict(prompt=[]), "prompt", "prompt must be a string"),
    (dict(prompt=[[1, 2], []]), "prompt", "prompt must be a string"),
    (dict(prompt=["a", 1]), "prompt", "prompt must be a string"),
    (dict(prompt=["a"] * 3, n=50), "prompt", "3 prompts with n=50 make 150 sequences"),
    (dict(extra_body={"logprobs": True}), "logprobs", "valid integer"),
    (dict(extra_body={"top_k": -2}), "top_k", "top_k"),
])
def test_bad_requests_are_400(client, live, kw, param, match):
    kw.setdefault("prompt", PROMPT)
    with pytest.raises(openai.BadRequestError, match=match) as info:
        client.completions.create(model=MODEL, **{"max_tokens": 4, **kw})
    assert_openai_error(info, param=param)
    assert live.idle()
    assert complete(client, max_tokens=2).choices[0].finish_reason is not None  # the engine keeps serving


def test_context_length_exceeded_code(client, live):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, max_tokens=MAX_MODEL_LEN)
    assert_openai_error(info, param="max_tokens", code="context_length_exceeded")
    assert info.value.status_code == 400


def test_out_of_vocabulary_in_a_batch_aborts_the_rest(client, live):
    """The second prompt is refused by the engine after the first was accepted: the first must not linger."""
    with pytest.raises(openai.BadRequestError, match="prompt token ids") as info:
        complete(client, prompt=[[1, 2, 3], [1, 10**6]], max_tokens=50, extra_body={"ignore_eos": True})
    assert_openai_error(info, param="prompt")
    assert live.idle()


def test_prompt_filling_the_context_without_max_tokens(live):
    word = live.app.state.serving_completion.tokenizer.encode("cache")[-1]
    body = {"model": MODEL, "prompt": [word] * MAX_MODEL_LEN, "max_tokens": None}
    r = httpx.post(live.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    body["prompt"] = [word] * (MAX_MODEL_LEN - 3)  # null max_tokens: the rest of the context
    r = httpx.post(live.url + "/v1/completions", json={**body, "ignore_eos": True}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert_openai_error(info, param="model", code="model_not_found")


def test_validation_error_names_the_field(live):
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "many"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_disconnect_mid_stream_frees_everything(live, monkeypatch):
    """Both prompts' requests are aborted when the client goes away; each step is slowed down so that the demo
    model cannot finish all 400 tokens before the client leaves."""
    engine = live.engine.engine
    real_step = engine.step

    def slow_step():
        time.sleep(0.01)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    before = live.engine.stats().num_generated_tokens
    body = {"model": MODEL, "prompt": ["go on", "and on"], "max_tokens": 100, "n": 2, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: a collected line iterator closes the connection
        for _ in range(6):
            next(lines)
        assert live.engine.stats().num_in_flight == 2  # one engine request per prompt, both still open
    assert live.idle(), "the aborted requests still hold the engine or cache blocks"
    assert live.engine.stats().num_generated_tokens - before < 400


def test_metrics_count_completions(live, client):
    def value(name):
        text = httpx.get(live.url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))

    e2e, tokens = value("gemma_tpa_e2e_request_latency_seconds_count"), value("gemma_tpa_generation_tokens_total")
    complete(client, prompt=["a", "b"], max_tokens=5, extra_body={"ignore_eos": True})
    assert value("gemma_tpa_e2e_request_latency_seconds_count") - e2e == 2  # one engine request per prompt
    assert value("gemma_tpa_generation_tokens_total") - tokens == 10


def test_api_key_covers_completions():
    server = LiveServer(["--model", "demo", "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                         "--cache-memory", "0.02", "--api-key", "s3cret"])
    try:
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            complete(bad)
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert complete(good, max_tokens=2).choices[0].finish_reason is not None
    finally:
        server.stop()


def test_engine_death_mid_stream_is_an_error_event():
    server = LiveServer(["--model", "demo", "--served-model-name", MODEL, "--max-model-len", str(MAX_MODEL_LEN),
                         "--cache-memory", "0.02"])
    try:
        engine = server.engine.engine
        engine.step = fail_after(engine.step, 3)
        body = {"model": MODEL, "prompt": ["hi", "there"], "max_tokens": 50, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        last = json.loads(events[-1].removeprefix("data: "))
        assert set(last["error"]) == {"message", "type", "param", "code"}
        assert last["error"]["code"] == "engine_dead"
        r = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()
