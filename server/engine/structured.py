"""Structured outputs: text held to a JSON Schema, a regular expression or a list of choices while it is sampled.

The grammars are llguidance's (the engine behind vLLM's and llama.cpp's structured outputs; Rust, no
dependencies): a request's constraint compiles once into a grammar, each of its sequences gets a matcher, and
before every draw the sequence's logits keep only the tokens its matcher allows; the drawn token is then fed to
the matcher, and the sequence stops as soon as the grammar is complete. llguidance sees the vocabulary as bytes:
from the `tokenizers` JSON of a tokenizer that has one, else from the tokenizer's `token_bytes()`.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from tpa_model.sampling import StructuredOutput

if TYPE_CHECKING:
    import llguidance

POWERS = (2 ** torch.arange(8)).to(torch.uint8)  # a byte's bits, lowest first, as llguidance packs its masks
# JSON as json.dumps writes it: ", " and ": ", no other whitespace (a schema's "x-guidance" may say otherwise).
# Free whitespace lets a model pad its answer with blank lines until max_tokens, which small models do.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class StructuredOutputError(ValueError):
    """The constraint cannot be compiled: an invalid JSON Schema or regular expression."""


def _llguidance() -> ModuleType:
    """The grammar engine, imported on first use: an engine that is never asked for structured output (or a
    machine without the package) runs without it."""
    try:
        import llguidance
    except ImportError as e:
        raise StructuredOutputError("structured outputs need the llguidance package (pip install llguidance)") from e
    return llguidance


class _VocabularyBytes:
    """What llguidance's TokenizerWrapper reads of a tokenizer without a `tokenizers` JSON."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens, special = tokenizer.token_bytes()
        self.special_token_ids = sorted(special)

    def __call__(self, text: str | bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


class StructuredOutputs:
    """Grammars and matchers for one engine's tokenizer. The vocabulary is read (about 3 s for 262k tokens) the first
    time a constraint is compiled; `compile` is safe to call from any thread, so the server does that first
    work outside the engine's loop."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Iterable[int]) -> None:
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, sorted(eos_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        llguidance = _llguidance()
        with self._lock:
            if self._ll_tokenizer is None:
                backend = getattr(self.tokenizer, "backend", None)  # a `tokenizers.Tokenizer`
                source = backend.to_str() if backend is not None else llguidance.TokenizerWrapper(
                    _VocabularyBytes(self.tokenizer))
                self._ll_tokenizer = llguidance.LLTokenizer(source, n_vocab=self.vocab_size, eos_token=self.eos_ids)
            return self._ll_tokenizer

    @functools.lru_cache(maxsize=64)  # noqa: B019 (one instance per engine, kept for its life)
    def compile(self, spec: StructuredOutput) -> str:
        """The llguidance grammar of `spec`; StructuredOutputError saying what is wrong with it."""
        llguidance = _llguidance()
        try:
            if spec.json_schema is not None:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_STYLE)
            elif spec.regex is not None:
                grammar = llguidance.grammar_from("regex", spec.regex)
            else:
                grammar = llguidance.grammar_from("choice", json.dumps(list(spec.choice)))
        except ValueError as e:
            raise StructuredOutputError(str(e)) from e
        error = llguidance.LLMatcher.validate_grammar(grammar, self.ll_tokenizer())
        if error:
            raise StructuredOutputError(error.strip())
        return grammar

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        return _llguidance().LLMatcher(self.ll_tokenizer(), self.compile(spec), log_level=0)

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, llguidance.LLMatcher]]) -> None:
        """Set to -inf, in place, each listed row's logits of the tokens its matcher does not allow now."""
        packed = torch.frombuffer(bytearray(b"".join(m.compute_bitmask() for _, m in rows)), dtype=torch.uint8)
        packed = packed.to(logits.device).view(len(rows), -1, 1)  # a bit per token: the copy is 1/8 of a bool mask
        banned = (packed & POWERS.to(logits.device)).eq(0).flatten(1)[:, :logits.shape[1]]
        index = [row for row, _ in rows]
        if index == list(range(len(logits))):  # every row, in order: no gather and scatter
            logits.masked_fill_(banned, float("-inf"))
        else:
            logits[index] = logits[index].masked_fill(banned, float("-inf"))


def consume(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed a sampled token to its matcher; True when the grammar is complete (the sequence stops)."""
    if not matcher.consume_token(token) or matcher.is_error():
        raise RuntimeError(f"structured output: token {token} does not continue the grammar: {matcher.get_error()}")
    return matcher.is_stopped()
