"""Incremental detokenization: generated token ids in, text deltas that are safe to stream out.

A token's text is not always final on its own. A byte-fallback piece may be one byte of a multi-byte
character, and SentencePiece spacing depends on the neighbouring pieces, so decoding tokens one at a time and
concatenating would be wrong. And text that could be the start of a stop string must not reach the client
until we know whether the stop string completes, because OpenAI leaves stop strings out of the output.
"""

from __future__ import annotations

from collections.abc import Sequence

from tpa_model.tokenizers.gemma_tokenizer import GemmaTokenizer

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text deltas, in O(1)-ish work per token.

    All emitted deltas together equal `tokenizer.decode(token_ids)`, cut right before the first stop string to
    complete. Each step decodes only a short window of ids: the ids whose text is not known yet, plus the ids
    decoded in the step before as left context. The window's new text is what follows the context's own text;
    this relies on decoding more ids only ever appending text once the context ends on a whole character, which
    holds for SentencePiece. A window whose text ends in U+FFFD is held back: its last bytes are most likely an
    unfinished character. An invalid byte sequence therefore comes out as U+FFFD, exactly as `decode` writes
    it, as soon as a later token shows that it cannot complete, or at `finish`.

    After a stop string completes (`stopped`) or after `finish`, `add` raises RuntimeError: the sequence is over.
    """

    def __init__(self, tokenizer: GemmaTokenizer, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True) -> None:
        if isinstance(stop, str):  # a lone string is one stop string, as in the OpenAI API
            stop = (stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        # The longest text that can be a proper prefix of a stop string, and so may have to be held back.
        self._max_held = max((len(s) for s in self._stops), default=1) - 1

        self._ids: list[int] = []
        self._window_start = 0  # first id of the decode window (left context for the ids not decoded yet)
        self._decoded_upto = 0  # ids before this index have had their text decoded
        self._context_text = ""  # text of ids[_window_start:_decoded_upto], decoded on its own
        self._held = ""  # decoded text not emitted yet because it could be the start of a stop string
        self._parts: list[str] = []  # the deltas returned so far
        self._finished = False
        self.stopped = False
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        """Everything emitted so far: the concatenation of all deltas returned by `add` and `finish`."""
        return "".join(self._parts)

    @property
    def token_ids(self) -> list[int]:
        """A copy of every id passed to `add`, including the one that completed a stop string."""
        return list(self._ids)

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text that has become safe to emit (often "")."""
        if self.stopped or self._finished:
            raise RuntimeError("cannot add tokens to a detokenizer that has stopped or finished")
        self._ids.append(int(token_id))
        window_text = self._decode(self._ids[self._window_start:])
        if window_text.endswith(REPLACEMENT_CHAR):
            return ""  # most likely a character whose remaining bytes are still to come
        return self._release(self._advance(window_text), final=False)

    def finish(self) -> str:
        """End of generation: return all text still held back. Later calls (and calls after a stop) return ""."""
        if self.stopped or self._finished:
            return ""
        self._finished = True
        new_text = ""
        if self._decoded_upto < len(self._ids):  # an unfinished character: decode writes it as U+FFFD
            new_text = self._advance(self._decode(self._ids[self._window_start:]))
        return self._release(new_text, final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, window_text: str) -> str:
        """Accept the window's text as final; return its new part and slide the window forward."""
        new_text = window_text[len(self._context_text):]
        self._window_start, self._decoded_upto = self._decoded_upto, len(self._ids)
        self._context_text = self._decode(self._ids[self._window_start:self._decoded_upto])
        return new_text

    def _release(self, new_text: str, final: bool) -> str:
        """Emit decoded text up to a completed stop string, or up to a possible stop-string start."""
        pending = self._held + new_text
        match = self._earliest_stop(pending)
        if match is not None:
            start, stop = match
            self.stopped = True
            self.stop_reason = stop
            self._held = ""
            return self._emit(pending[:start])
        keep = 0 if final else self._stop_prefix_length(pending)
        self._held = pending[len(pending) - keep:]
        return self._emit(pending[:len(pending) - keep])

    def _earliest_stop(self, pending: str) -> tuple[int, str] | None:
        """The stop string that completes first in `pending`, and where it starts.

        Earlier text never holds part of a stop string: it was emitted only once it could not begin one.
        On a tie in where they complete, the longer stop string wins, so no part of either is emitted.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = pending.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _stop_prefix_length(self, pending: str) -> int:
        """Length of the longest end of `pending` that some stop string starts with."""
        for length in range(min(len(pending), self._max_held), 0, -1):
            tail = pending[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0

    def _emit(self, delta: str) -> str:
        if delta:
            self._parts.append(delta)
        return delta
