"""The server with the real default model (Gemma 3 270M) and the chat model (SmolLM2), through the official
OpenAI SDK: real text, and the facts a greedy answer should name."""

from __future__ import annotations

import json

import pytest
from live_server import LiveServer
from openai import OpenAI


@pytest.fixture(scope="module")
def default_server():
    server = LiveServer(["--max-model-len", "1024", "--cache-memory", "0.2"], model=None)
    yield server
    server.stop()


def test_default_model_completes_text_with_the_right_fact(default_server):
    client = OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["gemma-3-270m"]
    r = client.completions.create(model="gemma-3-270m", prompt="The Eiffel Tower is located in the city of",
                                  max_tokens=6, temperature=0)
    assert "Paris" in r.choices[0].text and r.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="gemma-3-270m", prompt="Water is made of hydrogen and", max_tokens=4, temperature=0, stream=True))
    assert "oxygen" in streamed


def test_default_model_fills_in_a_choice_and_a_pattern(default_server):
    """Structured outputs on Gemma's SentencePiece vocabulary (262k pieces): a choice and a regular expression."""
    client = OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    r = client.completions.create(model="gemma-3-270m", prompt="The Eiffel Tower is located in the city of",
                                  max_tokens=8, temperature=0,
                                  extra_body={"structured_outputs": {"choice": [" Rome", " Paris", " London"]}})
    assert r.choices[0].text == " Paris" and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="gemma-3-270m", prompt="The year the Second World War ended:",
                                  max_tokens=8, temperature=0, extra_body={"guided_regex": " [0-9]{4}"})
    assert r.choices[0].text == " 1945" and r.choices[0].finish_reason == "stop"


def test_smollm2_answers_a_chat():
    server = LiveServer(["--max-model-len", "1024", "--cache-memory", "0.1"], model="smollm2")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0)
        assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
        # a JSON Schema, on a byte-level BPE vocabulary: the answer parses and has what the schema asks
        schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
                  "required": ["country", "capital"], "additionalProperties": False}
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
            max_tokens=40, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema}})
        answer = json.loads(r.choices[0].message.content)
        assert set(answer) == {"country", "capital"} and "Paris" in answer["capital"], answer
        assert r.choices[0].finish_reason == "stop"
    finally:
        server.stop()
