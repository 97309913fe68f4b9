"""Fuzzing: schemathesis against the server's own OpenAPI document (/openapi.json of a live demo server), with
every check schemathesis has, including the conformance of responses (status codes declared, response schemas,
content types) and the acceptance of valid and refusal of invalid data; zero failures.

Generated bodies would mostly stop at checks the document cannot express: the served model's name, the chat
template's role order, the length of prompt plus max_tokens against the model's, token ids (of prompts, of
logit_bias and of /detokenize) below the vocabulary size and other than the image placeholder in prompts,
fields that must agree (`best_of` and `n`, /tokenize's prompt or messages), which output constraints compile.
`reachable` mends those in the cases schemathesis means to be valid, and keeps them small (max_tokens, n), so
that they are tokenized and generate a few tokens in the engine. Cases meant to be invalid are sent as
generated and must be refused.
"""

import base64
import io
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from live_server import MODEL, LiveServer
from PIL import Image
from schemathesis import GenerationMode

# Examples per operation and phase (FUZZ_EXAMPLES=200 to fuzz longer); the module takes 15-20 s on 2 shared cores.
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 40))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    os.environ["GEMMA_TPA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    server = LiveServer(["--cache-memory", "0.05", "--max-num-seqs", "16", "--max-images-per-request", "2",
                         "--max-concurrent-image-fetches", "4", "--disable-remote-images"])
    yield server
    server.stop()


def tiny_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


PNG = tiny_png()


def chat_messages(messages: list) -> list:
    """The roles in the order Gemma's template takes (an optional system message, then user and assistant
    in turn, text only in the system message); at most two images, as data URLs."""
    images = 0

    def part(p: dict, system: bool) -> dict:
        nonlocal images
        if p.get("type") == "image_url" and not system and images < 2:
            images += 1
            return {**p, "image_url": {"url": PNG}}
        return {**{k: v for k, v in p.items() if k != "image_url"}, "type": "text", "text": p.get("text") or ""}

    messages = messages[:6]
    has_system = messages[0].get("role") in ("system", "developer")
    out = []
    for i, m in enumerate(messages):
        system = has_system and i == 0
        role = m["role"] if system else ("user", "assistant")[(i - has_system) % 2]
        content = m.get("content")
        if isinstance(content, list):
            content = [part(p, system) for p in content]
        out.append({**m, "role": role, "content": content})
    if len(out) == 1 and has_system:
        out.append({"role": "user", "content": "hi"})
    return out


# the document cannot say which JSON Schemas and regular expressions compile: valid bodies keep none of them
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice")


def reachable(body: dict, path: str, vocab: int, image_id: int | None) -> dict:
    """A valid body mended where the document cannot say what the server needs (see the module docstring)."""
    if path == "/detokenize":
        return {**body, "model": MODEL, "tokens": [int(t) % vocab for t in body["tokens"]]}
    if path == "/tokenize":  # exactly one of prompt and messages
        body = {**body, "model": MODEL}
        if body.get("messages"):
            return {**body, "prompt": None, "messages": chat_messages(body["messages"])}
        return {**body, "prompt": body.get("prompt") or "hi", "messages": None}
    body = {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "functions", "function_call",
                                                       "suffix", "audio", "modalities", "prediction",
                                                       *STRUCTURED_FIELDS)}
    body.update(model=MODEL, n=min(body.get("n", 1), 2), max_tokens=min(body.get("max_tokens") or 3, 3))
    if isinstance(body.get("seed"), int):  # the generator reads the bound 2**63 - 1 as a float, 2**63, and may pass it
        body["seed"] = min(max(body["seed"], -(2**63)), 2**63 - 1)
    if isinstance(body.get("logit_bias"), dict):  # token ids below the vocabulary size
        body["logit_bias"] = {str(int(k) % vocab): v for k, v in body["logit_bias"].items()}
    if path == "/v1/chat/completions":
        body["max_completion_tokens"] = None
        body["messages"] = chat_messages(body["messages"])
        if body.get("top_logprobs") is not None:
            body["logprobs"] = True
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and not isinstance(prompt[0], str):  # token ids (2.0 is an id too)
            # an image placeholder id without its image is refused (400), so a valid prompt has none
            clamp = lambda ids: [t if t != image_id else 0 for t in (int(t) % vocab for t in ids[:50])]  # noqa: E731
            prompt = [clamp(p) for p in prompt] if isinstance(prompt[0], list) else clamp(prompt)
        body["prompt"] = prompt[:4] if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else prompt
        body["best_of"] = None
    return body


@pytest.fixture(scope="module")
def api_schema(live):
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    vocab = live.engine.engine.model.config.vocab_size
    image_id = live.engine.engine.model.image_token_id

    @schema.hook
    def map_case(context, case):
        if not isinstance(case.body, dict):
            return case
        if case.meta.generation.mode == GenerationMode.POSITIVE:
            case.body = reachable(case.body, case.operation.path, vocab, image_id)
        elif isinstance(case.body.get("model"), str):  # so that invalid fields, not the model, are what is refused
            case.body = {**case.body, "model": MODEL}
        return case

    @schema.hook
    def after_call(context, case, response):
        key = (case.operation.path, case.meta.generation.mode.value, response.status_code)
        SEEN[key] = SEEN.get(key, 0) + 1

    return schema


SEEN: dict = {}  # (path, generation mode, status) -> responses
schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_server_conforms_to_its_own_schema(case, live):
    case.call_and_validate(timeout=30)


def test_fuzzed_requests_reached_the_engine_and_left_nothing_behind(live):
    """After the fuzzing above (same module, same server): valid cases were answered 200 (so they passed the
    checks and generated tokens), invalid ones 400; no request is left in the engine and every block is free."""
    if not SEEN:
        pytest.skip("needs test_the_server_conforms_to_its_own_schema to run first, in the same session")
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert SEEN.get((path, "positive", 200), 0) >= 20, SEEN
        assert SEEN.get((path, "negative", 400), 0) >= 20, SEEN
    assert live.engine.stats().num_generated_tokens >= 100
    assert live.idle(), live.engine.stats()


# -- what the fuzzing found, each fixed in server/openai/protocol.py or the server/openai modules --------------------


def post(live, path, body):
    import httpx

    return httpx.post(live.url + path, json=body, timeout=30)


@pytest.mark.parametrize("field,value", [
    ("stream", "true"), ("stream", 1), ("logprobs", "yes"), ("ignore_eos", 0), ("max_tokens", "3"),
    ("temperature", "0.5"), ("n", True), ("stream_options", {"include_usage": "on"}),
])
def test_values_of_the_wrong_json_type_are_400(live, field, value):
    """pydantic's lax mode took "true", 1 and "on" for booleans and "3" for numbers, which the document says are
    booleans and numbers (schemathesis: a schema-violating request accepted)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(field)


def test_integral_numbers_are_integers(live):
    """JSON has one number type, and JSON Schema's integer includes 2.0: token ids and logprobs written so were
    refused (schemathesis: a schema-valid request rejected). 2.5 and true still are."""
    r = post(live, "/v1/completions", {"model": MODEL, "prompt": [2.0, 40.0], "logprobs": 1.0, "max_tokens": 2.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["top_logprobs"][0]) >= 1
    for bad in ({"prompt": [2.5]}, {"prompt": [True]}, {"prompt": "x", "logprobs": True}):
        assert post(live, "/v1/completions", {"model": MODEL, "max_tokens": 2, **bad}).status_code == 400


def test_the_document_states_ranges_and_response_schemas(live):
    """The ranges the server checks, and the shapes of its answers (whole, and each streamed event), are in the
    document, so its conformance can be checked at all (the 200s had no schema before)."""
    import httpx

    doc = httpx.get(live.url + "/openapi.json").json()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    number = lambda prop: next(b for b in prop.get("anyOf", [prop]) if b.get("type") in ("number", "integer"))  # noqa: E731
    assert (number(chat["temperature"])["minimum"], number(chat["temperature"])["maximum"]) == (0, 2)
    assert (number(chat["n"])["minimum"], number(chat["n"])["maximum"]) == (1, 128)
    assert number(chat["top_p"])["exclusiveMinimum"] == 0 and number(chat["max_tokens"])["minimum"] == 1
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert ok["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert {"type": "string", "const": "[DONE]"} in data
    assert doc["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
