"""IncrementalDetokenizer against the tokenizer's own `decode` of the whole sequence, on a tiny trained vocabulary
whose byte fallback splits unseen characters (漢字, most emoji) into one token per byte."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm

from server.engine.detokenizer import IncrementalDetokenizer
from tpa_model.tokenizers.gemma_tokenizer import DEMO_CORPUS, GemmaTokenizer, train_sentencepiece

EXTRA_SENTENCES = [
    "Café, naïve, résumé and déjà vu.",
    "Ça coûte trois euros à Paris.",
    "日本語 and Ελληνικά are in the corpus, so they get pieces.",
]

ROUND_TRIP_TEXTS = [
    "Hello! How can I help you today?",
    "  two leading spaces,   three inside and one trailing ",
    "lines\nand\n\nblank lines\n",
    "\tdef add(a, b):\n    return a + b\n",
    "Digits 0123456789 and 3.14159 split one by one",
    "Café, naïve, résumé: é è ê",
    "漢字 unseen, so every byte is its own token: 漢字漢字",
    "Emoji 🙂🚀 and ZWJ sequences 👩‍💻 👨‍👩‍👧‍👦 🏳️‍🌈",
    "日本語 seen, 中文 unseen, Ελληνικά seen",
    " ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_sentencepiece(out / "tokenizer.model", DEMO_CORPUS + EXTRA_SENTENCES, vocab_size=512)
    return out


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> GemmaTokenizer:
    return GemmaTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def sp(tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))


def byte_id(sp: spm.SentencePieceProcessor, value: int) -> int:
    return sp.piece_to_id(f"<0x{value:02X}>")


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids until the detokenizer stops; the deltas, with finish()'s last."""
    deltas = []
    for token_id in ids:
        deltas.append(detok.add(token_id))
        assert detok.text == "".join(deltas)
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return deltas


def expected_with_stops(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Reference, written differently from the detokenizer: grow the text one character at a time and stop at
    the first length where it ends with a stop string (the longest one, if several end there)."""
    for end in range(1, len(text) + 1):
        done = [stop for stop in stops if text[:end].endswith(stop)]
        if done:
            stop = max(done, key=len)
            return text[:end - len(stop)], stop
    return text, None


def token_starts(tok: GemmaTokenizer, ids: list[int]) -> list[int]:
    """Character offset in the decoded text where each token's text starts (ids here are whole characters)."""
    return [len(tok.decode(ids[:i])) for i in range(len(ids))]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_streamed_text_equals_decode(tok: GemmaTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    detok = IncrementalDetokenizer(tok)
    emitted = ""
    for token_id in ids:
        delta = detok.add(token_id)
        assert "\ufffd" not in delta
        emitted += delta
        assert text.startswith(emitted)  # nothing is emitted before its bytes are complete, nothing changes later
    emitted += detok.finish()
    assert emitted == detok.text == text
    assert detok.token_ids == ids
    assert not detok.stopped and detok.stop_reason is None


def test_naive_per_token_decoding_would_be_wrong(tok: GemmaTokenizer) -> None:
    # Guards the test above: these texts really do split characters over byte-fallback tokens.
    for text in ("漢字", "🚀", "👨‍👩‍👧‍👦"):
        ids = tok.encode(text)
        assert len(ids) > len(text)
        assert "\ufffd" in "".join(tok.decode([token_id]) for token_id in ids)


def test_multibyte_character_is_held_until_complete(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = tok.encode("a漢")
    assert ids[1:] == [byte_id(sp, b) for b in "漢".encode()]
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(token_id) for token_id in ids] == ["a", "", "", "漢"]
    assert detok.finish() == ""


def test_invalid_bytes_become_replacement_chars_like_decode(tok: GemmaTokenizer,
                                                              sp: spm.SentencePieceProcessor) -> None:
    e6, bc, a2 = (byte_id(sp, b) for b in "漢".encode())
    letter = tok.encode("x")[0]
    # An unfinished character, proven invalid by a later letter, comes out as decode writes it, and only then.
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in (e6, bc)] == ["", ""]
    assert detok.add(letter) == tok.decode([e6, bc, letter]) == "\ufffd\ufffdx"
    # A stray lead byte followed by a complete character: the character still comes out whole.
    detok = IncrementalDetokenizer(tok)
    assert "".join(detok.add(i) for i in (e6, e6, bc, a2)) == tok.decode([e6, e6, bc, a2]) == "\ufffd漢"
    # An unfinished tail at the end of the stream is flushed by finish(), like decode does.
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in (letter, e6, bc)] == ["x", "", ""]
    assert detok.finish() == tok.decode([e6, bc])
    assert detok.text == tok.decode([letter, e6, bc])


def test_special_tokens(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = [tok.bos_id, *tok.encode("Hi"), tok.end_of_turn_id, *tok.encode(" there 漢"), tok.eos_id]
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == "Hi there 漢"
    assert deltas[0] == deltas[-2] == deltas[-1] == ""  # <bos> and <eos> add no text
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert "".join(stream(detok, ids)) == "<bos>Hi<end_of_turn> there 漢<eos>"
    # A special token inside a byte sequence splits it, as in decode.
    e6, bc, a2 = (byte_id(sp, b) for b in "漢".encode())
    for skip in (True, False):
        broken = [e6, tok.end_of_turn_id, bc, a2, *tok.encode("ok")]
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join(stream(detok, broken)) == tok.decode(broken, skip_special_tokens=skip)


def test_random_ids_match_decode(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    # Arbitrary ids, weighted towards byte pieces so that invalid and interrupted UTF-8 is common.
    rng = random.Random(0)
    byte_ids = [byte_id(sp, b) for b in range(256)]
    specials = [tok.bos_id, tok.eos_id, tok.end_of_turn_id, tok.start_of_turn_id]
    for _ in range(300):
        ids = [rng.choice([rng.randrange(tok.vocab_size), rng.choice(byte_ids), rng.choice(byte_ids),
                           rng.choice(specials)]) for _ in range(rng.randrange(1, 25))]
        skip = rng.random() < 0.7
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        final = tok.decode(ids, skip_special_tokens=skip)
        for token_id in ids:
            detok.add(token_id)
            assert final.startswith(detok.text)
        detok.finish()
        assert detok.text == final, ids


def test_decode_window_stays_short(tok: GemmaTokenizer) -> None:
    calls: list[int] = []

    class CountingTokenizer:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = " ".join(DEMO_CORPUS) + " 漢字 🚀 " * 20
    ids = tok.encode(text)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(CountingTokenizer())  # type: ignore[arg-type]
    assert "".join(stream(detok, ids)) == text
    assert max(calls) <= 8  # a 4-byte character plus its left context, never the whole sequence
    assert len(calls) <= 2 * len(ids) + 2


def test_stop_string_spanning_tokens(tok: GemmaTokenizer) -> None:
    text = "The weather this morning is cool and a little cloudy."
    stop = "ther this mor"
    ids = tok.encode(text)
    starts = token_starts(tok, ids)
    first = text.index(stop)
    assert first not in starts and first + len(stop) not in starts  # starts and ends mid-token
    assert sum(first < s < first + len(stop) for s in starts) >= 2  # spans at least three tokens

    detok = IncrementalDetokenizer(tok, stop=[stop])
    for token_id in ids:
        detok.add(token_id)
        assert "The wea".startswith(detok.text)  # never a character of the stop string, even for a while
        if detok.stopped:
            break
    assert detok.finish() == ""
    assert detok.text == "The wea" == text[:first]
    assert detok.stopped and detok.stop_reason == stop
    assert detok.token_ids == ids[:len(detok.token_ids)] and len(detok.token_ids) < len(ids)
    with pytest.raises(RuntimeError):
        detok.add(ids[0])


def test_stop_string_inside_one_token_drops_the_rest_of_it(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    text = "Hello world, goodbye"
    ids = tok.encode(text)
    pieces = [sp.id_to_piece(i) for i in ids]
    assert "ood" in pieces  # the stop string below sits inside this one token
    detok = IncrementalDetokenizer(tok, stop=["oo"])
    deltas = stream(detok, ids)
    assert detok.text == "".join(deltas) == "Hello world, g"
    assert detok.stop_reason == "oo"
    assert detok.token_ids == ids[:pieces.index("ood") + 1]


def test_earliest_completed_stop_wins(tok: GemmaTokenizer) -> None:
    text = "Hello world, goodbye"
    ids = tok.encode(text)
    cases = {
        ("goodbye", "world"): ("Hello ", "world"),  # list order does not matter
        ("Hello world", "lo"): ("Hel", "lo"),  # "lo" completes first although "Hello world" starts earlier
        ("ld", "world"): ("Hello ", "world"),  # both complete at once: the longer one, so no part is emitted
        ("xyz", "bye"): ("Hello world, good", "bye"),
    }
    for stops, (expected_text, expected_reason) in cases.items():
        assert expected_with_stops(text, list(stops)) == (expected_text, expected_reason)
        detok = IncrementalDetokenizer(tok, stop=stops)
        stream(detok, ids)
        assert (detok.text, detok.stop_reason) == (expected_text, expected_reason), stops
        assert detok.stopped


def test_stop_prefix_is_held_then_released(tok: GemmaTokenizer) -> None:
    text = "see you tomorrow at ten, see you tomor"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, stop=["tomorrow!", "ten."])
    deltas = [detok.add(token_id) for token_id in ids]
    assert not detok.stopped
    assert detok.text == "see you tomorrow at ten, see you "  # "tomor" might still become "tomorrow!"
    assert "tomorrow at " in "".join(deltas[:ids.index(tok.encode(" at")[0]) + 2])  # released once disproved
    assert detok.finish() == "tomor"
    assert detok.text == text and detok.stop_reason is None
    assert detok.finish() == ""


def test_stop_string_of_byte_fallback_characters(tok: GemmaTokenizer) -> None:
    text = "a 漢字 b 🚀 c"
    ids = tok.encode(text)
    for stop, expected in [("漢字", "a "), ("字 b", "a 漢"), ("🚀", "a 漢字 b "), (" c", "a 漢字 b 🚀")]:
        detok = IncrementalDetokenizer(tok, stop=stop)
        deltas = stream(detok, ids)
        assert "\ufffd" not in "".join(deltas)
        assert detok.text == expected and detok.stop_reason == stop


def test_random_stops_match_reference(tok: GemmaTokenizer) -> None:
    rng = random.Random(1)
    alphabet = ["a", "b", "ab", " ", "  ", "\n", "é", "漢", "🚀", "the ", "morning"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        stops = []
        for _ in range(rng.randrange(1, 4)):
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randrange(1, 6)] if rng.random() < 0.8 else "zz")
        ids = tok.encode(text)
        detok = IncrementalDetokenizer(tok, stop=stops)
        expected_text, expected_reason = expected_with_stops(text, stops)
        for token_id in ids:
            detok.add(token_id)
            assert expected_text.startswith(detok.text), (text, stops)
            if detok.stopped:
                break
        detok.finish()
        assert (detok.text, detok.stop_reason) == (expected_text, expected_reason), (text, stops)
        assert detok.stopped == (expected_reason is not None)


def test_invalid_stop_strings(tok: GemmaTokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, stop=["ok", ""])
    detok = IncrementalDetokenizer(tok)
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.add(tok.encode("a")[0])
