"""Tokenizers for checkpoints that carry no SentencePiece `tokenizer.model`: GGUF files and Hugging Face directories.

`TokenizersTokenizer` offers the surface the engine, server and detokenizer use (the one `GemmaTokenizer` has),
built on Hugging Face's Rust `tokenizers` library, so that BPE is never written by hand here. It is built from

* a GGUF file's tokenizer metadata (`TokenizersTokenizer.from_gguf`): llama.cpp's SentencePiece-style
  vocabularies (`tokenizer.ggml.model = "llama"`) and byte-level BPE ones (`"gpt2"`);
* a Hugging Face directory's `tokenizer.json` and `tokenizer_config.json` (`TokenizersTokenizer.from_hf_dir`),
  as LlamaForCausalLM safetensors checkpoints ship them.

Chats are rendered by the checkpoint's own Jinja chat template in a sandbox, as transformers renders them, or,
for a Gemma vocabulary that carries no template, by Gemma 3's template (`render_gemma3_chat`).

`load_tokenizer(path)` picks the right tokenizer for a path: `.gguf` file, directory with `tokenizer.model`
(`GemmaTokenizer`), or directory with `tokenizer.json`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .gemma_tokenizer import (
    BOS,
    CONTROL_STRINGS,
    END_OF_TURN,
    IMAGE_SOFT_TOKEN,
    REQUIRED_PIECES,
    ChatEncoding,
    ChatTemplateError,
    GemmaTokenizer,
    cut_at,
    render_gemma3_chat,
)

# llama.cpp's token types (`tokenizer.ggml.token_type`, enum llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in the common chat formats: Gemma, ChatML, Llama 3, Phi-3. Each one the
# vocabulary has as a single special token stops generation, along with eos.
TURN_END_TOKENS = (END_OF_TURN, "<|im_end|>", "<|eot_id|>", "<|end|>")

# Architectures whose SentencePiece vocabulary ranks merges by position in the file rather than by score.
GEMMA_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding"})

SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# Pre-tokenizer splits for byte-level BPE vocabularies, by `tokenizer.ggml.pre` (the names llama.cpp's converter
# writes). The regexes are the ones the models' own tokenizer.json files use.
_GPT2_FAMILY = ("gpt2", "default", "mpt", "olmo", "jais")
# StarCoder-style: every digit on its own, then GPT-2's regex between them (Digits + ByteLevel in tokenizer.json).
_DIGITS_GPT2_FAMILY = ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_O200K_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "falcon-h1"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4"), _O200K_SPLIT),
}
BYTE_LEVEL_PRE_TOKENIZERS = frozenset({*_GPT2_FAMILY, *_DIGITS_GPT2_FAMILY, *_REGEX_SPLITS})


class TokenizersTokenizer(ChatEncoding):
    """Text <-> ids through a `tokenizers.Tokenizer`, with the checkpoint's special tokens and chat template.

    Offers what the engine, server and detokenizer use of `GemmaTokenizer`, with the same meaning:
    `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `image_token_id`, `stop_token_ids`, `encode`, `decode`,
    `render_chat` and `encode_chat`.

    `tokenizer` must have no post-processor that matters: ids are always encoded without the library's
    special-token insertion, and `encode(add_bos=True)` adds bos itself, when `add_bos_token` says the model
    expects one. Added tokens marked `special` are the ones `decode(skip_special_tokens=True)` drops.
    """

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str, bos_token: str | None = None,
                 pad_token: str | None = None, unk_token: str | None = None, add_bos_token: bool = False,
                 chat_template: str | None = None, extra_stop_ids: Iterable[int] = (), source: str = "") -> None:
        self.backend = tokenizer
        self.source = source or "tokenizer"
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ValueError(f"{self.source}: the vocabulary is empty")
        self._vocab_size = max(vocab.values()) + 1
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self._bos_id = self._token_id(bos_token, "bos") if bos_token is not None else None
        self._eos_id = self._token_id(eos_token, "eos")
        self._pad_id = self._token_id(self.pad_token, "pad")
        self.add_bos_token = bool(add_bos_token) and self._bos_id is not None
        self.chat_template = chat_template or None
        self._special_ids = frozenset(token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
                                      if token.special)
        turn_ends = {self._single_special_id(token) for token in TURN_END_TOKENS}
        extra = {int(token_id) for token_id in extra_stop_ids if 0 <= int(token_id) < self._vocab_size}
        self._stop_ids = frozenset({self._eos_id, *extra, *turn_ends} - {None})
        self._image_token_id = self._single_special_id(IMAGE_SOFT_TOKEN, special_only=False)
        # Gemma 3's template writes these pieces as text; they must each come back as one id.
        self._gemma_chat = all(self._single_special_id(piece, special_only=False) is not None
                               for piece in REQUIRED_PIECES)
        # Ids that message text must never encode to (see `mark_controls`).
        named = {self._single_special_id(piece, special_only=False) for piece in (*CONTROL_STRINGS, *TURN_END_TOKENS)}
        self._control_ids = frozenset((self._special_ids | named) - {None})

    # ----- construction -----

    @classmethod
    def from_gguf(cls, path: str | Path, reader: Any = None) -> TokenizersTokenizer:
        """The tokenizer a GGUF file's metadata describes. `reader`: the file's header already open elsewhere
        (`gguf.open_gguf`, shared with the model's loader), else the file is read here."""
        from ..checkpoints.gguf import open_gguf

        path = Path(path)
        if reader is None:
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            try:
                reader = open_gguf(path)  # the same reader the model's loader uses
            except ValueError as e:  # bad magic, truncated file, ...
                raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        return cls.from_gguf_metadata(_gguf_tokenizer_metadata(reader), source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "GGUF file") -> TokenizersTokenizer:
        """From GGUF metadata as a plain dict (keys as in the file, e.g. `tokenizer.ggml.tokens`)."""
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise ValueError(f"{source} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        tokens = list(tokens)
        types = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")

        def token_of(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is None or not 0 <= int(token_id) < len(tokens):
                return None
            return tokens[int(token_id)]

        if kind == "llama":
            tokenizer, spelled = _sentencepiece_bpe(tokens, types, meta, token_of("unknown_token_id"))
            add_bos_default = True  # llama.cpp adds bos to a SentencePiece vocabulary unless the file says not to
        elif kind == "gpt2":
            tokenizer, spelled = _byte_level_bpe(tokens, types, meta, source)
            add_bos_default = False
        else:
            raise ValueError(f"{source}: unsupported tokenizer.ggml.model {kind!r}; supported: 'llama', 'gpt2'")
        _add_gguf_special_tokens(tokenizer, tokens, types, spelled)

        eos = token_of("eos_token_id")
        if eos is None:
            raise ValueError(f"{source}: tokenizer.ggml.eos_token_id is missing or outside the vocabulary")
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(
            tokenizer,
            eos_token=eos,
            bos_token=token_of("bos_token_id"),
            pad_token=token_of("padding_token_id"),
            unk_token=token_of("unknown_token_id"),
            add_bos_token=add_bos_default if add_bos is None else bool(add_bos),
            chat_template=meta.get("tokenizer.chat_template"),
            source=source,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> TokenizersTokenizer:
        """From a Hugging Face directory: `tokenizer.json`, plus `tokenizer_config.json` (special tokens,
        add_bos_token, chat_template), `chat_template.jinja` and `generation_config.json` (eos ids) if present."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path} (expected {tokenizer_file})")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}

        eos = _token_text(config.get("eos_token"))
        if eos is None:
            where = config_file if config_file.is_file() else f"{path} (it has no tokenizer_config.json)"
            raise ValueError(f"{where} names no eos_token; a model needs one to end its replies")
        bos = _token_text(config.get("bos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the tokenizer.json post-processor says whether the model wants bos
            bos_id = tokenizer.token_to_id(bos) if bos is not None else None
            add_bos = bos_id is not None and tokenizer.encode("", add_special_tokens=True).ids[:1] == [bos_id]

        chat_template = _config_chat_template(config, config_file)
        template_file = path / "chat_template.jinja"
        if template_file.is_file():  # recent transformers save the template here, not in the config
            chat_template = template_file.read_text(encoding="utf-8")

        extra_stop_ids: list[int] = []
        generation_file = path / "generation_config.json"
        if generation_file.is_file():
            eos_ids = _read_json(generation_file).get("eos_token_id")
            extra_stop_ids = [eos_ids] if isinstance(eos_ids, int) else [i for i in eos_ids or [] if isinstance(i, int)]

        return cls(
            tokenizer,
            eos_token=eos,
            bos_token=bos,
            pad_token=_token_text(config.get("pad_token")),
            unk_token=_token_text(config.get("unk_token")),
            add_bos_token=bool(add_bos),
            chat_template=chat_template,
            extra_stop_ids=extra_stop_ids,
            source=str(path),
        )

    def _token_id(self, token: str, what: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{self.source}: the {what} token {token!r} is not in the vocabulary")
        return token_id

    def _single_special_id(self, token: str, special_only: bool = True) -> int | None:
        """The id of `token` if the vocabulary has it as one token that text containing it encodes to."""
        token_id = self.backend.token_to_id(token)
        if token_id is None or (special_only and token_id not in self._special_ids):
            return None
        return token_id if self.backend.encode(token, add_special_tokens=False).ids == [token_id] else None

    # ----- the tokenizer surface -----

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        """None for vocabularies without a bos token (then `add_bos_token` is False)."""
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """The checkpoint's pad token, else eos."""
        return self._pad_id

    @property
    def image_token_id(self) -> int | None:
        return self._image_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """eos, the chat format's turn-end token (`<end_of_turn>`, `<|im_end|>`, ...) where the vocabulary has it
        as a special token, and a HF directory's generation_config eos ids."""
        return self._stop_ids

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Ids of `text`; special-token text in it (`<end_of_turn>`, `<|im_end|>`, ...) becomes its single id.

        `add_bos` asks for the start of sequence this checkpoint's model expects: bos is prepended when the
        checkpoint's tokenizer adds one (`add_bos_token`: GGUF `tokenizer.ggml.add_bos_token`, tokenizer_config
        `add_bos_token`), and never twice to text that already starts with it.
        """
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token and (not ids or ids[0] != self._bos_id):
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped when `skip_special_tokens`, else written out."""
        checked = []
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self._vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self._vocab_size})")
            if self.backend.id_to_token(token_id) is None:
                raise ValueError(f"token id {token_id} has no piece in the vocabulary")
            checked.append(token_id)
        return self.backend.decode(checked, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat: the checkpoint's Jinja chat template, else Gemma 3's for a Gemma vocabulary.

        For a Jinja template, list-of-parts contents become their text parts joined (image parts are refused:
        these checkpoints read text only); template errors and `raise_exception` become ChatTemplateError.
        """
        if self.chat_template is not None:
            return render_jinja_chat(
                self.chat_template, _text_only_messages(messages), add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, unk_token=self.unk_token,
                pad_token=self.pad_token,
            )
        if self._gemma_chat and self.bos_token == BOS:
            return render_gemma3_chat(messages, add_generation_prompt=add_generation_prompt)
        raise ChatTemplateError(f"{self.source} carries no chat template, and its vocabulary is not Gemma's; "
                                "it can only complete plain prompts")

    def mark_controls(self, text: str) -> str:
        """`text` with its control strings cut (see tokenizer.CUT), so that `encode_marked` encodes them as text.

        The control strings are found by the library itself (an encoding's ids and offsets), so exactly what
        it would match is cut, however many special tokens the vocabulary has. With a dummy-prefix normalizer
        (SentencePiece vocabularies with `add_space_prefix`) the text after a cut gets that prefix's space.
        """
        encoding = self.backend.encode(text, add_special_tokens=False)
        controls = self._control_ids
        starts = [start for token_id, (start, _) in zip(encoding.ids, encoding.offsets) if token_id in controls]
        return cut_at(text, starts)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, which `from_hf_dir` reads back to this tokenizer (a
        TPA checkpoint converted from a GGUF file carries its tokenizer this way)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                  "unk_token": self.unk_token, "add_bos_token": self.add_bos_token}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        extra = sorted(self._stop_ids - {self._eos_id})
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if extra:
            (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [self._eos_id, *extra]}) + "\n")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, vocab_size={self._vocab_size})"


def load_tokenizer(path: str | Path, gguf_reader: Any = None) -> GemmaTokenizer | TokenizersTokenizer:
    """The tokenizer of a checkpoint.

    * a `.gguf` file: from its metadata (`gguf_reader`, its header from `gguf.open_gguf`, saves reading it twice);
    * a directory with `tokenizer.model`: `GemmaTokenizer.from_dir` (a non-Gemma SentencePiece model falls
      back to the directory's `tokenizer.json` when it has one);
    * a directory with `tokenizer.json`: `TokenizersTokenizer.from_hf_dir`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: the path does not exist")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return TokenizersTokenizer.from_gguf(path, reader=gguf_reader)
        raise ValueError(f"{path} is not a .gguf file; give a .gguf file or a checkpoint directory")
    if (path / "tokenizer.model").is_file():
        try:
            return GemmaTokenizer.from_dir(path)
        except ValueError:
            if not (path / "tokenizer.json").is_file():
                raise
    if (path / "tokenizer.json").is_file():
        return TokenizersTokenizer.from_hf_dir(path)
    raise FileNotFoundError(f"no tokenizer in {path}: expected {path / 'tokenizer.model'} or "
                            f"{path / 'tokenizer.json'}")


# ----- chat templates -----


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> jinja2.Template:
    """A chat template compiled in a sandbox, with the environment transformers renders templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the checkpoint's chat template does not compile: {e}") from e


def render_jinja_chat(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                      **special_tokens: str | None) -> str:
    """Render a Hugging Face chat template for `messages`; `special_tokens` (bos_token, eos_token, ...) are
    visible to it, as transformers passes them."""
    compiled = _compile_template(template)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except ChatTemplateError:
        raise
    except (jinja2.TemplateError, TypeError) as e:
        raise ChatTemplateError(f"the chat template cannot render this conversation: {e}") from e


def _text_only_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a Jinja template: copies whose list-of-parts contents are joined into one string."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or len(messages) == 0:
        raise ChatTemplateError("conversation is empty; it needs at least one message")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        if not isinstance(message["role"], str):
            raise ChatTemplateError(f"message {index} role must be a string, got {message['role']!r}")
        content = message["content"]
        if isinstance(content, list):
            texts = []
            for part_index, part in enumerate(content):
                where = f"message {index} content part {part_index}"
                if not isinstance(part, Mapping) or "type" not in part:
                    raise ChatTemplateError(f"{where} must be a dict with a 'type', got {part!r}")
                if part["type"] != "text":
                    raise ChatTemplateError(f"{where} has type {part['type']!r}; this model reads text parts only")
                if not isinstance(part.get("text"), str):
                    raise ChatTemplateError(f"{where} is a text part without a string 'text'")
                texts.append(part["text"])
            content = "".join(texts)
        elif not isinstance(content, str):
            raise ChatTemplateError(f"message {index} content must be a string or a list of parts, "
                                    f"got {type(content).__name__}")
        out.append({**message, "content": content})
    return out


# ----- GGUF metadata -----

_TOKENIZER_KEY = re.compile(r"^tokenizer\.")


def _gguf_tokenizer_metadata(reader: Any) -> dict[str, Any]:
    """The `tokenizer.*` fields of a GGUF file's header (`gguf_reader.GGUFFile`), plus `general.architecture`."""
    return {name: value for name, value in reader.fields.items()
            if _TOKENIZER_KEY.match(name) or name == "general.architecture"}


def _merges_from_vocabulary(tokens: Sequence[str], priority: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary that lists none (llama.cpp keeps only pieces and scores).

    Every way to cut a piece into two pieces of the vocabulary is a merge. They are ranked by the merged piece's
    priority, highest first; one piece's cuts by longer left part first; ties keep vocabulary order.
    """
    index: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        index.setdefault(token, token_id)
    known = set(index)
    found = []
    for token, token_id in index.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in known and right in known:
                found.append((-priority[token_id], -cut, cut - len(token), token_id, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _respell_spaces(token: str) -> str:
    """A whitespace-only piece stored with real spaces ("  ") is SentencePiece's "▁▁": after the normalizer turns
    spaces into "▁", that spelling is the only one BPE can produce."""
    return token.replace(" ", SPIECE_SPACE) if " " in token and not token.strip() else token


def _sentencepiece_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any],
                       unk: str | None) -> tuple[Tokenizer, list[str]]:
    """llama.cpp's "llama" vocabulary: SentencePiece BPE with byte fallback (`<0xNN>` pieces)."""
    present = set(tokens)
    spelled = [_respell_spaces(token) for token in tokens]
    spelled = [new if new == old or new not in present else old for new, old in zip(spelled, tokens)]
    if meta.get("general.architecture") in GEMMA_ARCHITECTURES:
        # Gemma's file order is its merge order; its user-defined pieces carry placeholder scores.
        priority = [-float(token_id) for token_id in range(len(tokens))]
    else:
        priority = [float(score) for score in meta.get("tokenizer.ggml.scores") or []]
        if len(priority) != len(tokens):
            raise ValueError(f"tokenizer.ggml.scores has {len(priority)} entries for {len(tokens)} tokens")
    vocab = {token: token_id for token_id, token in enumerate(spelled)}
    merges = _merges_from_vocabulary(spelled, priority)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                     dropout=None))
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):  # llama.cpp's default for SentencePiece vocabularies
        # SentencePiece's dummy prefix: a "▁" before the text, even text that starts with a space, and (as
        # llama.cpp does) before the text after each added token; decoding drops one leading space.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE),
                                                     normalizers.Replace(" ", SPIECE_SPACE)])
        steps.append(decoders.Strip(content=" ", left=1))
    else:
        tokenizer.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer, spelled


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map: printable Latin-1 bytes stand for themselves, the others
    take the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(others)})
    return mapping


def _byte_level_bpe(tokens: list[str], types: list[int], meta: Mapping[str, Any],
                    source: str) -> tuple[Tokenizer, list[str]]:
    """llama.cpp's "gpt2" vocabulary: byte-level BPE with the merges the file lists."""
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(f"{source}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: "
                         f"{', '.join(sorted(BYTE_LEVEL_PRE_TOKENIZERS))}")
    merges_text = meta.get("tokenizer.ggml.merges")
    if not merges_text:
        raise ValueError(f"{source}: a byte-level BPE vocabulary needs tokenizer.ggml.merges")
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Vocabulary pieces are spelled in the byte alphabet. A special token the converter stored as plain text
    # keeps that spelling, and is matched in text as an added token; any other piece is respelled.
    spelled = [
        token if set(token) <= letters or kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
        else "".join(alphabet[b] for b in token.encode("utf-8"))
        for token, kind in zip(tokens, types)
    ]
    merges = []
    for line in merges_text:
        left, sep, right = line.partition(" ")
        if not sep:
            raise ValueError(f"{source}: malformed merge {line!r}")
        merges.append((left, right))
    vocab = {token: token_id for token_id, token in enumerate(spelled)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    if pre in _GPT2_FAMILY:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif pre in _DIGITS_GPT2_FAMILY:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, spelled


def _add_gguf_special_tokens(tokenizer: Tokenizer, tokens: list[str], types: list[int], spelled: list[str]) -> None:
    """CONTROL tokens become special added tokens (matched whole in text, dropped by skip_special_tokens);
    USER_DEFINED ones become plain added tokens (matched whole, always decoded), as llama.cpp treats them.

    A user-defined piece the vocabulary respelled (Gemma's space runs) stays an ordinary BPE piece.
    """
    control, user = [], []
    for token, kind, spelling in zip(tokens, types, spelled):
        if kind == TOKEN_CONTROL:
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == TOKEN_USER_DEFINED and token == spelling:
            user.append(AddedToken(token, normalized=False, special=False))
    before = tokenizer.get_vocab_size(with_added_tokens=True)
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    if tokenizer.get_vocab_size(with_added_tokens=True) != before:
        raise ValueError("a GGUF special token did not map onto its own id in the vocabulary")


# ----- Hugging Face directories -----


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A tokenizer_config special token: a string, or a serialized AddedToken ({"content": ...})."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_chat_template(config: Mapping[str, Any], config_file: Path) -> str | None:
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{config_file}: chat_template must be a string or have a 'default' entry")
