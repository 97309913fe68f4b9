"""GemmaTokenizer against independent references: SentencePiece itself and transformers' Gemma tokenizer
driven by the official Gemma 3 chat template."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jinja2
import pytest
import sentencepiece as spm
import transformers

from tpa_model.tokenizers.gemma_tokenizer import DEMO_CORPUS, ChatTemplateError, GemmaTokenizer, train_sentencepiece

# The chat template of google/gemma-3-*-it (tokenizer_config.json "chat_template"), reformatted one
# statement per line; the `-` whitespace control makes the layout irrelevant to the output.
GEMMA3_CHAT_TEMPLATE = """
{{- bos_token -}}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") -}}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") -}}
    {%- if message['content'] is string -%}
        {{- message['content'] | trim -}}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{- '<start_of_image>' -}}
            {%- elif item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception("Invalid content type") -}}
    {%- endif -%}
    {{- '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""

EXTRA_SENTENCES = [
    "Tokenizers split text into pieces; models only ever see the ids.",
    "Résumé, naïve and café are French loanwords.",
]

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "  What is the capital of France?\n"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And how many days are in a leap year? 漢字 🙂"},
    ],
    "user_only": [{"role": "user", "content": "Hello!"}],
    "ends_with_assistant": [
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": " 1, 2, 3 "},
    ],
    "content_parts_and_image": [
        {"role": "system", "content": [{"type": "text", "text": "Describe pictures briefly."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " What is in this picture? "}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A small robot in a kitchen."}]},
        {"role": "user", "content": "Thank you!"},
    ],
    "control_strings_in_content": [
        {"role": "user", "content": "Say <end_of_turn> and <bos> back to me."},
    ],
}


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


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir: Path):
    """transformers' own Gemma tokenizer, converted from the same tokenizer.model (no network)."""
    return transformers.GemmaTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def hf_chat_ids(hf_tok, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = hf_tok.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=True,
                                     add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def test_training_is_fast_deterministic_and_gemma_shaped(tmp_path: Path, tokenizer_dir: Path) -> None:
    start = time.perf_counter()
    path = train_sentencepiece(tmp_path / "again" / "tokenizer.model", DEMO_CORPUS + EXTRA_SENTENCES)
    assert time.perf_counter() - start < 2.0
    assert path.read_bytes() == (tokenizer_dir / "tokenizer.model").read_bytes()

    processor = spm.SentencePieceProcessor(model_file=str(path))
    assert [processor.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert processor.encode("2024") == [processor.piece_to_id(d) for d in "2024"]  # split digits
    assert not processor.encode("Hello", out_type=str)[0].startswith("▁")  # no dummy prefix
    assert processor.decode(processor.encode("  a   b \n")) == "  a   b \n"  # whitespace kept as is
    assert len(DEMO_CORPUS) >= 24 and all(isinstance(s, str) and s for s in DEMO_CORPUS)


def test_special_ids_are_found_by_piece(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor, hf_tok) -> None:
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.vocab_size == sp.get_piece_size()
    named = {
        "<bos>": tok.bos_id,
        "<eos>": tok.eos_id,
        "<pad>": tok.pad_id,
        "<start_of_turn>": tok.start_of_turn_id,
        "<end_of_turn>": tok.end_of_turn_id,
        "<start_of_image>": tok.start_of_image_id,
        "<end_of_image>": tok.end_of_image_id,
        "<image_soft_token>": tok.image_token_id,
    }
    for piece, token_id in named.items():
        assert sp.id_to_piece(token_id) == piece
        assert hf_tok.convert_tokens_to_ids(piece) == token_id
    assert len(set(named.values())) == len(named)
    assert tok.stop_token_ids == frozenset({tok.eos_id, tok.end_of_turn_id})


def _train_raw(out: Path, user_defined: list[str]) -> Path:
    """A Gemma-like model whose symbols sit at other ids than train_sentencepiece puts them."""
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEMO_CORPUS), model_prefix=str(out / "tokenizer"), model_type="bpe",
        vocab_size=400, hard_vocab_limit=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=user_defined,
        byte_fallback=True, add_dummy_prefix=False, num_threads=1, minloglevel=2,
    )
    return out


def test_ids_follow_the_vocabulary_and_added_tokens(tmp_path: Path) -> None:
    # Like the real Gemma 3 files: turn markers after unused pieces, <image_soft_token> only in added_tokens.json.
    unused = [f"<unused{i}>" for i in range(7)]
    model_dir = _train_raw(tmp_path, unused + ["<end_of_turn>", "<start_of_turn>"])
    tok = GemmaTokenizer.from_dir(model_dir)
    assert (tok.end_of_turn_id, tok.start_of_turn_id) == (11, 12)
    assert tok.start_of_image_id is None and tok.image_token_id is None
    sp_size = tok.vocab_size

    (model_dir / "added_tokens.json").write_text(json.dumps({"<image_soft_token>": sp_size}))
    tok = GemmaTokenizer.from_dir(model_dir)
    assert tok.image_token_id == sp_size and tok.vocab_size == sp_size + 1
    ids = tok.encode("a<image_soft_token><image_soft_token>b")
    assert ids.count(sp_size) == 2
    assert tok.decode(ids, skip_special_tokens=False) == "a<image_soft_token><image_soft_token>b"
    assert tok.decode(ids) == "ab"


def test_vocabulary_without_turn_markers_is_rejected(tmp_path: Path) -> None:
    model_dir = _train_raw(tmp_path, ["<start_of_turn>"])
    with pytest.raises(ValueError, match="<end_of_turn>"):
        GemmaTokenizer.from_dir(model_dir)


def test_missing_tokenizer_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        GemmaTokenizer.from_dir(tmp_path)


def test_render_chat_literal(tok: GemmaTokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": " Hi\n"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.render_chat(messages) == (
        "<bos><start_of_turn>user\nBe brief. \n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tok.render_chat(messages[1:2], add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_chat_matches_official_template(tok: GemmaTokenizer, hf_tok, name: str,
                                               add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[name]
    rendered = hf_tok.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False,
                                          add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt=add_generation_prompt) == rendered

    ids = tok.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    if name == "control_strings_in_content":
        # A deliberate departure from transformers, which parses control strings typed in message text (a
        # user could forge turns): here they are text; only the template's make control ids.
        assert ids != hf_chat_ids(hf_tok, messages, add_generation_prompt)
        assert tok.decode(ids, skip_special_tokens=False) == rendered
        assert ids.count(tok.bos_id) == 1 and ids.count(tok.end_of_turn_id) == 1
    else:
        assert ids == hf_chat_ids(hf_tok, messages, add_generation_prompt)
        assert ids.count(tok.bos_id) == rendered.count("<bos>")
    assert ids[0] == tok.bos_id
    assert ids.count(tok.start_of_turn_id) == rendered.count("<start_of_turn>")


def test_system_conversation_ids_by_hand(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    # A second, transformers-free reference: the same ids assembled from SentencePiece on each text segment.
    messages = CONVERSATIONS["system_multi_turn"]
    sot, eot = tok.start_of_turn_id, tok.end_of_turn_id
    expected = (
        [tok.bos_id, sot] + sp.encode("user\nYou are a helpful assistant. Answer in one sentence.\n\n"
                                      "What is the capital of France?") + [eot] + sp.encode("\n")
        + [sot] + sp.encode("model\nThe capital of France is Paris.") + [eot] + sp.encode("\n")
        + [sot] + sp.encode("user\nAnd how many days are in a leap year? 漢字 🙂") + [eot] + sp.encode("\n")
        + [sot] + sp.encode("model\n")
    )
    assert tok.encode_chat(messages) == expected


def test_segment_wise_encoding_equals_whole_string(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor,
                                                    hf_tok) -> None:
    left, right = "The train leaves at 7:45, ", "  and arrives at 9:10."
    for marker, marker_id in [("<end_of_turn>", tok.end_of_turn_id), ("<start_of_image>", tok.start_of_image_id)]:
        text = left + marker + right
        assert tok.encode(text) == tok.encode(left) + [marker_id] + tok.encode(right)
        assert tok.encode(text) == sp.encode(text)  # user-defined symbols: SentencePiece agrees on the whole
    # <bos>/<eos> are control pieces SentencePiece would spell out; we map them like transformers does.
    text = "<bos>Hello<eos> world"
    assert tok.encode(text) == [tok.bos_id, *sp.encode("Hello"), tok.eos_id, *sp.encode(" world")]
    assert tok.encode(text) == hf_tok.encode(text, add_special_tokens=False)


def test_add_bos(tok: GemmaTokenizer) -> None:
    assert tok.encode("Hi", add_bos=True) == [tok.bos_id] + tok.encode("Hi")
    assert tok.encode("<bos>Hi", add_bos=True) == [tok.bos_id] + tok.encode("Hi")
    assert tok.encode("", add_bos=True) == [tok.bos_id]
    assert tok.encode("") == []


@pytest.mark.parametrize("text", [
    "Café, naïve, résumé.",
    "漢字 and かな mixed with English",
    "Emoji: 🙂🚀 and 👩‍💻 too",
    "  leading, trailing and  double  spaces \n\ttabs\n",
])
def test_round_trip_non_ascii(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert sp.unk_id() not in ids


def test_unseen_characters_use_byte_fallback(tok: GemmaTokenizer, sp: spm.SentencePieceProcessor) -> None:
    ids = tok.encode("漢")
    assert [sp.id_to_piece(i) for i in ids] == ["<0xE6>", "<0xBC>", "<0xA2>"]
    assert tok.decode(ids) == "漢"


def test_decode_special_tokens(tok: GemmaTokenizer) -> None:
    messages = CONVERSATIONS["content_parts_and_image"]
    ids = tok.encode_chat(messages)
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(messages)
    plain = tok.decode(ids)
    for piece in ("<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>"):
        assert piece not in plain
    assert plain.startswith("user\nDescribe pictures briefly.\n\nWhat is in this picture?\n")
    assert tok.decode([tok.eos_id, tok.pad_id]) == ""
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_content_parts_render_like_strings(tok: GemmaTokenizer) -> None:
    as_string = [{"role": "user", "content": "  What is in this picture?  "}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "  What is in this picture?  "}]}]
    assert tok.render_chat(as_parts) == tok.render_chat(as_string)
    assert tok.encode_chat(as_parts) == tok.encode_chat(as_string)

    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert tok.render_chat(with_image) == (
        "<bos><start_of_turn>user\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"
    )
    with_url = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "text", "text": "Describe it."}]}]
    assert tok.render_chat(with_url) == tok.render_chat(with_image)
    assert tok.encode_chat(with_image).count(tok.start_of_image_id) == 1


NOT_ALTERNATING = {
    "user_user": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                  r"must alternate user/assistant/user/\.\.\.; message 1 has role 'user' after 'user'"),
    "assistant_first": ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                        "message 0 has role 'assistant' but the first turn must be 'user'"),
    "assistant_after_system": ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
                               "message 1 has role 'assistant' but the first turn must be 'user'"),
    "assistant_assistant": ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "assistant", "content": "c"}],
                            "message 2 has role 'assistant' after 'assistant'"),
}


@pytest.mark.parametrize("name", list(NOT_ALTERNATING))
def test_roles_must_alternate(tok: GemmaTokenizer, hf_tok, name: str) -> None:
    messages, message = NOT_ALTERNATING[name]
    with pytest.raises(ChatTemplateError, match=message):
        tok.render_chat(messages)
    with pytest.raises(ChatTemplateError):
        tok.encode_chat(messages)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):  # the official template agrees
        hf_tok.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=False)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "message 1 is a system message; only the first message may be one"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "system", "content": "t"}],
     "message 2 is a system message"),
    ([], "conversation is empty"),
    ([{"role": "system", "content": "s"}], "no user message"),
    ([{"role": "tool", "content": "42"}], "message 0 has unknown role 'tool'"),
    ([{"role": "user"}], "message 0 must be a dict with 'role' and 'content'"),
    ([{"role": "user", "content": None}], "message 0 content must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "audio"}]}], "content part 0 has unknown type 'audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], "content part 0 is a text part without a string"),
    ([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "a"}],
     "may contain only text parts"),
])
def test_invalid_conversations(tok: GemmaTokenizer, messages: list[dict], message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        tok.render_chat(messages)
    assert issubclass(ChatTemplateError, ValueError)
