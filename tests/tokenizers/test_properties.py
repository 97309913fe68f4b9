"""Property tests (hypothesis): the chat template, the tokenizers' round trip and the incremental detokenizer,
for any text, on the demo model's SentencePiece tokenizer and on the two real models' tokenizers (GGUF, read
with `tokenizers`). The image pipeline's properties (any bytes give an image or a 400) are in
tests/openai/test_images_security.py.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.engine.detokenizer import IncrementalDetokenizer
from tpa_model.tokenizers.gemma_tokenizer import CUT

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Control strings of both chat formats, typed as text: they must never become control tokens.
CONTROL_STRINGS = ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_turn>model\n",
                   "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|im_start|>", "<|im_end|>",
                   "<|endoftext|>", "<s>", "</s>", CUT]

# Any Unicode text a JSON body can carry (no lone surrogates: the API refuses them with a 400), with control
# strings and awkward characters (byte-fallback CJK, emoji with ZWJ, combining marks, newlines) mixed in.
chars = st.characters(exclude_categories=["Cs"])
texts = st.lists(st.one_of(st.text(chars, max_size=12), st.sampled_from(CONTROL_STRINGS),
                           st.sampled_from(["漢字", "👩‍💻", "e\u0301", "\n\n", "  ", "\t", "\r\n", "0123"])),
                 max_size=6).map("".join)


@pytest.fixture(scope="module", params=["demo", "gemma-3-270m", "smollm2"])
def tokenizer(request, tmp_path_factory):
    """The demo model's GemmaTokenizer (SentencePiece), and the real models' (tokenizers from GGUF)."""
    import os

    from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

    if request.param == "demo":
        from tpa_model.checkpoints.named_models import resolve_model

        os.environ.setdefault("GEMMA_TPA_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_tokenizer(resolve_model("demo"))
    from conftest import real_model_path

    tokenizer = load_tokenizer(real_model_path(request.param))
    NAMES[id(tokenizer)] = request.param
    return tokenizer


NAMES: dict[int, str] = {}


def tokenizer_name(tokenizer) -> str:
    return NAMES.get(id(tokenizer), "demo")


def control_ids(tokenizer) -> set[int]:
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, *tokenizer.stop_token_ids,
           getattr(tokenizer, "image_token_id", None), getattr(tokenizer, "start_of_turn_id", None),
           getattr(tokenizer, "end_of_turn_id", None), getattr(tokenizer, "start_of_image_id", None)}
    return ids - {None}


# -- the chat template ------------------------------------------------------------------------------------------


@st.composite
def chats(draw):
    """Any chat the template allows: an optional system message, then user and assistant in turn; contents as
    strings or lists of text parts (and image placeholders in user turns)."""
    def content(role):
        if draw(st.booleans()):
            return draw(texts)
        kinds = st.sampled_from(["text", "image"]) if role == "user" else st.just("text")
        return [{"type": "text", "text": draw(texts)} if draw(kinds) == "text" else {"type": "image"}
                for _ in range(draw(st.integers(1, 3)))]

    messages = [{"role": "system", "content": content("system")}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(1, 4))):
        role = ("user", "assistant")[i % 2]
        messages.append({"role": role, "content": content(role)})
    return messages


def skeleton(messages):
    """The same chat with every text replaced by "x": what the template alone makes of it."""
    def blank(content):
        if isinstance(content, str):
            return "x"
        return [{"type": "text", "text": "x"} if p["type"] == "text" else p for p in content]

    return [{**m, "content": blank(m["content"])} for m in messages]


@FAST
@given(messages=chats())
def test_any_chat_renders_and_its_text_never_makes_control_tokens(tokenizer, messages):
    """Every chat of allowed roles and any text encodes; the control ids in it are exactly those of the
    template (the same chat with plain texts): typed control strings stay text."""
    if getattr(tokenizer, "image_token_id", None) is None:  # a text-only vocabulary: no image parts
        messages = [{**m, "content": [p for p in m["content"] if p["type"] == "text"] or "x"}
                    if isinstance(m["content"], list) else m for m in messages]
    ids = tokenizer.encode_chat(messages)
    controls = control_ids(tokenizer)
    assert [i for i in ids if i in controls] == [i for i in tokenizer.encode_chat(skeleton(messages))
                                                 if i in controls]
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


# -- the tokenizer round trip -----------------------------------------------------------------------------------


# SmolLM2's byte-level vocabulary has no token for six ASCII control bytes (EOT, ACK, DC3, DC4, SYN, GS) nor for
# the UTF-8 lead bytes 0xF1 and 0xF2 (planes 4-11, where nothing is assigned): its BPE cannot write text holding
# them, as llama.cpp's cannot. Every other text round-trips, for every vocabulary.
UNENCODABLE_BYTES = {"smollm2": {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2}}


@FAST
@given(text=texts)
def test_decode_of_encode_is_the_text(tokenizer, text):
    """Any text, control strings and CUT included, comes back unchanged: encode parses control strings, and
    decode without skipping writes them out."""
    missing = UNENCODABLE_BYTES.get(tokenizer_name(tokenizer), set())
    assume(not missing.intersection(text.encode()))
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False) == text


def test_the_unencodable_bytes_are_exactly_those_listed(tokenizer):
    """One character per UTF-8 byte (ASCII and the lead bytes of longer sequences): those that do not come back
    are those whose bytes the vocabulary lacks."""
    samples = [chr(c) for c in range(0x80)] + [chr(0x80 + 0x40 * k) for k in range(30)]  # 2-byte leads C2-DF
    samples += [chr(0x800 if lead == 0xE0 else (lead - 0xE0) * 0x1000) for lead in range(0xE0, 0xF0)]
    samples += [chr(0x10000 if lead == 0xF0 else (lead - 0xF0) * 0x40000) for lead in range(0xF0, 0xF5)]
    lost = {c for c in samples if tokenizer.decode(tokenizer.encode(c), skip_special_tokens=False) != c}
    missing = UNENCODABLE_BYTES.get(tokenizer_name(tokenizer), set())
    assert lost == {c for c in samples if missing.intersection(c.encode())}
    assert len(lost) == len(missing)


# -- the incremental detokenizer --------------------------------------------------------------------------------


def byte_fallback_ids(tokenizer) -> set[int]:
    """Ids of the `<0xNN>` pieces of a `tokenizers` vocabulary with byte fallback (Gemma 3 270M's)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return set()
    return {i for i in range(min(tokenizer.vocab_size, 1024)) if re.fullmatch(r"<0x[0-9A-F]{2}>",
                                                                              backend.id_to_token(i) or "")}


def ordinary_ids(tokenizer) -> st.SearchStrategy[list[int]]:
    """Generated ids as a model might sample them: any id of the vocabulary that is not a control token (the
    byte-fallback pieces included, so characters arrive a byte at a time; but see
    test_tokenizers_byte_fallback_writes_a_whole_invalid_run_as_replacement_characters)."""
    excluded = control_ids(tokenizer) | byte_fallback_ids(tokenizer)
    ids = st.integers(0, tokenizer.vocab_size - 1).filter(lambda i: i not in excluded)
    return st.lists(ids, max_size=24)


def test_tokenizers_byte_fallback_writes_a_whole_invalid_run_as_replacement_characters():
    """A known difference, left as it is: `tokenizers`' ByteFallback decoder writes every byte of a run that is
    not valid UTF-8 as U+FFFD, the valid ones too, so decoding more ids can rewrite earlier text. The
    detokenizer (which streams, and gives the non-streamed text too) keeps what it emitted: NUL, then U+FFFD,
    where decode writes two U+FFFD. Only byte sequences that are not UTF-8 differ, which a model writes only
    when it samples stray byte pieces; the property tests above leave byte pieces out for this tokenizer."""
    from conftest import real_model_path

    from tpa_model.tokenizers.hf_tokenizer import load_tokenizer

    tokenizer = load_tokenizer(real_model_path("gemma-3-270m"))
    nul, continuation = (tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in (0x00, 0x80))
    assert tokenizer.decode([nul]) == "\x00" and tokenizer.decode([nul, continuation]) == "\ufffd\ufffd"
    assert run(tokenizer, [nul, continuation], ())[1] == "\x00\ufffd"


def run(tokenizer, ids, stop):
    detok = IncrementalDetokenizer(tokenizer, stop)
    deltas = []
    for i in ids:
        deltas.append(detok.add(i))
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return detok, "".join(deltas)


@FAST
@given(data=st.data())
def test_incremental_decoding_equals_full_decoding(tokenizer, data):
    ids = data.draw(ordinary_ids(tokenizer))
    detok, text = run(tokenizer, ids, ())
    assert text == tokenizer.decode(ids) == detok.text and not detok.stopped


@FAST
@given(data=st.data())
def test_stop_strings_never_leak(tokenizer, data):
    """With stop strings (often taken from the text itself, so they do occur): the output holds none of them;
    it is the full text cut right before the stop string that completed first, or the full text if none did."""
    ids = data.draw(ordinary_ids(tokenizer))
    full = tokenizer.decode(ids)
    pieces = st.text(chars, min_size=1, max_size=4)
    if full:
        start = data.draw(st.integers(0, len(full) - 1))
        pieces = st.one_of(pieces, st.integers(1, 4).map(lambda n: full[start:start + n]))
    stop = data.draw(st.lists(pieces, min_size=1, max_size=4))
    detok, text = run(tokenizer, ids, stop)
    assert not any(s in text for s in stop)
    if detok.stopped:
        upto = text + detok.stop_reason
        assert detok.stop_reason in stop and full.startswith(upto)
        assert not any(s in upto[:-1] for s in stop)  # no stop string completed before this one
    else:
        assert text == full
