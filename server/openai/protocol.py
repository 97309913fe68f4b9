"""The OpenAI wire format of chat completions and legacy text completions: request models (pydantic) and
response builders."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, field_validator

from tpa_model.sampling import (
    MAX_LOGIT_BIAS,
    MAX_LOGPROBS,
    MAX_REPETITION_PENALTY,
    MAX_STOP_SEQUENCES,
    MIN_REPETITION_PENALTY,
    StructuredOutput,
)

MAX_N = 128  # samples per request: more would let one request crowd out every other


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error this server answers, for the OpenAPI document (APIError.body() writes it)."""

    error: ErrorDetail


class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True)
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


# -- what the OpenAPI document says of the fields' values ----------------------------------------------------
#
# The ranges below are checked by SamplingParams.validate and the routes (with messages that name the field),
# not by pydantic; they are written into the document so that it says which values the server accepts.


def bounds(**limits):
    """json_schema_extra that puts `limits` (minimum, maximum, ...) on a field's numbers: the field itself, the
    items of a list, or the non-null branch of an optional one."""
    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            target = branch.get("items", branch) if branch.get("type") == "array" else branch
            if target.get("type") in ("integer", "number"):
                target.update(limits)
    return extra


def stop_schema(schema: dict[str, Any]) -> None:
    """Stop sequences are non-empty strings, at most MAX_STOP_SEQUENCES of them."""
    for branch in schema["anyOf"]:
        if branch.get("type") == "string":
            branch["minLength"] = 1
        elif branch.get("type") == "array":
            branch.update(maxItems=MAX_STOP_SEQUENCES, items={"type": "string", "minLength": 1})


def prompt_schema(schema: dict[str, Any]) -> None:
    """Lists of prompts, and of token ids, are not empty; token ids are not negative."""
    for branch in schema["anyOf"]:
        if branch.get("type") == "array":
            branch["minItems"] = 1
            items = branch["items"]
            if items.get("type") == "array":
                items["minItems"] = 1
                items = items["items"]
            if items.get("type") == "integer":
                items["minimum"] = 0


TOKEN_ID_KEY = "^(0|[1-9][0-9]*)$"  # logit_bias's keys: token ids as JSON object keys, which are strings


def logit_bias_schema(schema: dict[str, Any]) -> None:
    """logit_bias maps token ids, written in decimal, to biases in OpenAI's range."""
    for branch in schema["anyOf"]:
        if branch.get("type") == "object":
            branch["propertyNames"] = {"pattern": TOKEN_ID_KEY}
            branch["additionalProperties"].update(minimum=-MAX_LOGIT_BIAS, maximum=MAX_LOGIT_BIAS)


def constraint(json_schema: dict[str, Any] | str | None = None, regex: str | None = None,
               choice: list[str] | None = None) -> StructuredOutput:
    """A structured output from vLLM's fields (a schema given as an object or as JSON text)."""
    if json_schema is not None and not isinstance(json_schema, str):
        json_schema = json.dumps(json_schema)
    return StructuredOutput(json_schema=json_schema, regex=regex, choice=None if choice is None else tuple(choice))


def json_int(value: Any) -> Any:
    """JSON has one number type: 2.0 is the integer 2 (as JSON Schema's "integer" says), while true is not a
    number at all. Integral floats become ints; anything else goes on to pydantic's strict int check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JSONInt = Annotated[StrictInt, BeforeValidator(json_int)]  # 2 and 2.0, never true or 2.5


class JSONSchemaFormat(BaseModel):
    """response_format's json_schema: the schema the output must be valid under (its name and strict flag are
    accepted; the schema is always enforced)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs extra: exactly one of a JSON Schema, a regular expression, a list of choices."""

    model_config = ConfigDict(extra="forbid", strict=True)
    json_schema: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share: the model, the sampling options, streaming and vLLM's extras.

    Unknown fields are ignored; fields we cannot honour are refused by the route. Types are strict, as the
    OpenAPI document states them: "true" or 1 is not a boolean, "5" not a number (but 5.0 is the integer 5).
    """

    model_config = ConfigDict(extra="allow", strict=True)
    prompt_param: ClassVar[str]  # the field that holds the prompt, for errors about its length
    model: str
    max_tokens: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=1))
    temperature: float | None = Field(None, json_schema_extra=bounds(minimum=0, maximum=2))
    top_p: float | None = Field(None, json_schema_extra=bounds(exclusiveMinimum=0, maximum=1))
    n: JSONInt = Field(1, json_schema_extra=bounds(minimum=1, maximum=MAX_N))
    seed: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=-(2**63), maximum=2**63 - 1))
    stop: str | list[str] | None = Field(None, json_schema_extra=stop_schema)
    presence_penalty: float = Field(0.0, json_schema_extra=bounds(minimum=-2, maximum=2))
    frequency_penalty: float = Field(0.0, json_schema_extra=bounds(minimum=-2, maximum=2))
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra=logit_bias_schema)
    response_format: ResponseFormat | None = None
    # extras that vLLM-style clients send through extra_body
    top_k: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=-1))
    min_p: float | None = Field(None, json_schema_extra=bounds(minimum=0, maximum=1))
    repetition_penalty: float | None = Field(
        None, json_schema_extra=bounds(minimum=MIN_REPETITION_PENALTY, maximum=MAX_REPETITION_PENALTY))
    ignore_eos: bool = False
    stop_token_ids: list[JSONInt] | None = Field(None, json_schema_extra=bounds(minimum=0))
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spelling of structured_outputs
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    def token_bias(self) -> dict[int, float]:
        """logit_bias with its keys as token ids (its values are checked with the other sampling options)."""
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(TOKEN_ID_KEY, key):
                raise APIError(400, f"logit_bias keys must be token ids in decimal digits, got {key!r}",
                               param="logit_bias")
            bias[int(key)] = value
        return bias

    def structured_output(self) -> tuple[str, StructuredOutput] | None:
        """(the field that asked, the constraint) of the one field that asks for structured output, if any."""
        asked: list[tuple[str, StructuredOutput]] = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            asked.append(("response_format", StructuredOutput(json_schema='{"type": "object"}')))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.json_schema is None:
                raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                               param="response_format")
            asked.append(("response_format", StructuredOutput(json_schema=json.dumps(fmt.json_schema.json_schema))))
        if self.structured_outputs is not None:
            given = self.structured_outputs.model_dump(exclude_none=True)
            if len(given) != 1:
                raise APIError(400, "structured_outputs takes exactly one of json, regex and choice",
                               param="structured_outputs")
            asked.append(("structured_outputs", constraint(**given)))
        for name, key in (("guided_json", "json_schema"), ("guided_regex", "regex"), ("guided_choice", "choice")):
            if getattr(self, name) is not None:
                asked.append((name, constraint(**{key: getattr(self, name)})))
        if len(asked) > 1:
            raise APIError(400, f"{asked[0][0]} and {asked[1][0]} both constrain the output; give one",
                           param=asked[1][0])
        return asked[0] if asked else None

    def token_limit(self) -> tuple[str, int | None]:
        """(field name, value) of the output length limit, so errors name the field the client used."""
        return "max_tokens", self.max_tokens

    def logprob_count(self) -> int | None:
        """SamplingParams.logprobs: None for none, k for the chosen token's logprob and k alternatives."""
        raise NotImplementedError

    def prompt_logprob_count(self) -> int | None:
        """SamplingParams.prompt_logprobs: the same for the prompt's tokens; none by default."""
        return None

    def fewest_tokens(self) -> int:
        """The least max_tokens may be."""
        return 1

    def text_lengths(self) -> list[int]:
        """Characters of each text the request asks to tokenize, for the limit checked before tokenizing."""
        raise NotImplementedError


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    prompt_param: ClassVar[str] = "messages"
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=1))
    logprobs: bool = False
    top_logprobs: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=0, maximum=MAX_LOGPROBS))

    def token_limit(self) -> tuple[str, int | None]:
        """OpenAI's newer max_completion_tokens wins over max_tokens when both are set."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def text_lengths(self) -> list[int]:
        """The chat is tokenized as one text: its messages together."""
        return [sum(message_chars(m) for m in self.messages)]


class CompletionRequest(SamplingRequest):
    """POST /v1/completions, the legacy API for base models that continue text.

    `prompt` is a string, a list of token ids, or a list of either (a batch: each is a request of its own).
    `logprobs` is strict: a chat-style `true` is a mistake here, not one alternative.
    """

    prompt_param: ClassVar[str] = "prompt"
    prompt: str | list[str] | list[JSONInt] | list[list[JSONInt]] = Field(json_schema_extra=prompt_schema)
    # OpenAI's default for this endpoint; null means up to the context length
    max_tokens: JSONInt | None = Field(16, json_schema_extra=bounds(minimum=0))  # 0: only with echo
    logprobs: JSONInt | None = Field(None, json_schema_extra=bounds(minimum=0, maximum=MAX_LOGPROBS))
    echo: bool = False
    best_of: JSONInt | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def check_prompt(cls, value: Any) -> Any:
        """One clear message for every wrong shape, instead of pydantic's error for each branch of the union."""
        if isinstance(value, list):  # token ids written as 2.0 are ids too
            value = [[json_int(t) for t in p] if isinstance(p, list) else json_int(p) for p in value]
        if isinstance(value, str) or (isinstance(value, list) and value and (
                all(isinstance(p, str) for p in value) or all(is_token_id(t) for t in value)
                or all(isinstance(p, list) and p and all(is_token_id(t) for t in p) for p in value))):
            return value
        raise ValueError("prompt must be a string, a non-empty list of token ids, or a non-empty list of either")

    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt a string or a list of token ids."""
        if isinstance(self.prompt, str) or is_token_id(self.prompt[0]):
            return [self.prompt]
        return list(self.prompt)

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        """echo with logprobs shows the prompt's tokens with their logprobs too."""
        return self.logprobs if self.echo else None

    def fewest_tokens(self) -> int:
        """0 with echo: the prompt alone, as scoring clients ask for it."""
        return 0 if self.echo else 1

    def text_lengths(self) -> list[int]:
        """Each prompt of a batch is tokenized on its own."""
        return [len(p) for p in self.prompts() if isinstance(p, str)]


# -- responses, for the OpenAPI document (the routes build them as dicts; tests/openai/test_fuzz.py checks they match)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TokenLogprob):
    top_logprobs: list[TokenLogprob]


class ChatLogprobs(BaseModel):
    content: list[ContentLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    """A whole chat completion (with `stream`, the answer is server-sent events instead)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # null for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str


class CompletionResponse(BaseModel):
    """A whole text completion (with `stream`, the answer is server-sent events instead)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion; the last, with include_usage, has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed text completion."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeRequest(BaseModel):
    """POST /tokenize (as vLLM has it): exactly one of a text prompt, tokenized as /v1/completions does, and a
    chat, rendered as /v1/chat/completions renders it (with the generation prompt, images as their soft tokens)."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # a prompt's bos, where the model expects one


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(BaseModel):
    """POST /detokenize: token ids back to text, special tokens written out."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str
    tokens: list[JSONInt] = Field(json_schema_extra=bounds(minimum=0))


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "dead"]


def message_chars(m: ChatMessage) -> int:
    if m.content is None or isinstance(m.content, str):
        return len(m.content or "")
    return sum(len(p.text or "") for p in m.content)


def lone_surrogate_field(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string in `value` (a request's model_dump()) that UTF-8 cannot encode, or
    None. JSON's "\\ud800" escape parses to such a string, and a tokenizer would fail on it with a 500."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate_field(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def is_token_id(value: Any) -> bool:
    return type(value) is int  # not bool, which is an int to isinstance


UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction")
UNSUPPORTED_COMPLETION_FIELDS = ("suffix",)  # insertion needs a fill-in-the-middle model


def new_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text, control tokens written out, as logprobs show it."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_prompt_logprobs(tokenizer, prompt_ids: list[int], scored: list) -> dict[str, Any]:
    """The prompt's part of an echoed completion's logprobs object: `scored` has (logprob, top) for each prompt
    token after the first, which has no context to be scored in (null, as OpenAI writes it)."""
    first = token_text(tokenizer, prompt_ids[0])
    rest = legacy_logprobs(tokenizer, prompt_ids[1:], [lp for lp, _ in scored], [top for _, top in scored],
                           offset=len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def text_end(logprobs: dict[str, Any]) -> int:
    """Where the text after a legacy logprobs object's tokens starts, as its text_offset counts."""
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def joined_logprobs(head: dict[str, Any] | None, tail: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two legacy logprobs objects as one: the second's entries after the first's."""
    if head is None or tail is None:
        return head or tail
    return {key: head[key] + tail[key] for key in head}


def logprobs_content(tokenizer, token_ids: list[int], logprobs: list[float], tops: list) -> dict[str, Any]:
    """OpenAI's logprobs object: one entry per generated token, with its top alternatives."""

    def entry(token_id: int, lp: float) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for token_id, lp, top in zip(token_ids, logprobs, tops):
        item = entry(token_id, lp)
        item["top_logprobs"] = [entry(t, v) for t, v in (top or [])]
        content.append(item)
    return {"content": content}


def legacy_logprobs(tokenizer, token_ids: list[int], logprobs: list[float], tops: list,
                    offset: int = 0) -> dict[str, Any]:
    """The text-completions logprobs object: parallel lists, one entry per token.

    `top_logprobs` maps each alternative's text to its logprob, the sampled token always among them (so up to
    k + 1 entries, as OpenAI documents); where two ids share a text the likelier one is kept. `text_offset` is
    where each token starts in the choice's text, counting from `offset`: the sum of the token texts before it.
    """
    tokens = [token_text(tokenizer, t) for t in token_ids]
    top_logprobs, offsets = [], []
    for text, lp, top in zip(tokens, logprobs, tops):
        alternatives: dict[str, float] = {}
        for t, v in top or []:
            alternatives.setdefault(token_text(tokenizer, t), v)
        alternatives.setdefault(text, lp)
        top_logprobs.append(alternatives)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": top_logprobs, "text_offset": offsets}
