"""Gemma 3 tokenizer: a SentencePiece model plus Gemma's control strings and chat template.

We wrap `sentencepiece` directly instead of depending on transformers, so serving needs only the
`tokenizer.model` file. Ids of control pieces are always looked up by piece, never hard-coded, so the same
code runs on the real Gemma 3 vocabulary and on the tiny vocabularies trained on the fly for tests and demos.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"

# Strings that become a single id when they appear in text, whichever of them the vocabulary has.
CONTROL_STRINGS = (BOS, EOS, PAD, START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN)
# Pieces a tokenizer cannot serve chats without.
REQUIRED_PIECES = (BOS, EOS, PAD, START_OF_TURN, END_OF_TURN)
# Gemma's user-defined symbols, in the order train_sentencepiece gives them ids.
USER_DEFINED_SYMBOLS = (START_OF_TURN, END_OF_TURN, START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN)

ROLES = ("system", "user", "assistant")
IMAGE_PART_TYPES = ("image", "image_url")


class ChatTemplateError(ValueError):
    """A conversation the Gemma 3 chat template cannot render."""


# -- control strings in message text ----------------------------------------------------------------------
#
# A chat is rendered to one string by its template and that string is encoded with control strings parsed,
# so `<end_of_turn>` typed in a message would become the control token and let a user forge turns. Before
# rendering, every control string in message text is therefore cut by CUT, a private-use character, right
# after its first character (a literal CUT is doubled). The template sees nothing it would treat
# differently, and no cut control string matches any more. The rendered string is then encoded in the pieces
# between single CUTs (`marked_chunks`): the template's own control strings still become their ids, while
# a cut one is encoded as the plain text it is.

CUT = "\ue000"
_CUT_OR_ESCAPE = re.compile(f"({CUT}{CUT}|{CUT})")


def cut_at(text: str, starts: Iterable[int]) -> str:
    """`text` with CUT after the character at each of `starts` (the starts of its control strings, in
    order), and each literal CUT doubled."""
    out, position = [], 0
    for start in starts:
        out.append(text[position:start + 1].replace(CUT, CUT + CUT))
        out.append(CUT)
        position = start + 1
    out.append(text[position:].replace(CUT, CUT + CUT))
    return "".join(out)


def marked_chunks(text: str) -> list[str]:
    """The pieces of a marked text between its single CUTs, each doubled CUT back to one."""
    chunks, current = [], []
    for piece in _CUT_OR_ESCAPE.split(text):
        if piece == CUT:
            chunks.append("".join(current))
            current = []
        else:
            current.append(CUT if piece == CUT + CUT else piece)
    chunks.append("".join(current))
    return chunks


def mark_messages(messages: Sequence[Mapping[str, Any]], mark) -> list[Any]:
    """Copies of `messages` whose text (string contents, text parts) went through `mark`; anything else is
    left as it is, for the template to judge."""
    return [_mark_message(m, mark) if isinstance(m, Mapping) else m for m in messages]


def _mark_message(message: Mapping[str, Any], mark) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        content = mark(content)
    elif isinstance(content, list):
        content = [{**part, "text": mark(part["text"])}
                   if isinstance(part, Mapping) and isinstance(part.get("text"), str) else part
                   for part in content]
    return {**message, "content": content}


class ChatEncoding:
    """Chats encoded so that only the template makes control tokens, for a tokenizer with `render_chat`,
    `encode` and `mark_controls` (the CUT-marked form of a text's control strings)."""

    def render_chat_marked(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The template's text for `messages`, their own control strings cut (see CUT); for `encode_marked`."""
        return self.render_chat(mark_messages(messages, self.mark_controls), add_generation_prompt)

    def encode_marked(self, text: str) -> list[int]:
        """Ids of a marked text: each piece between cuts encoded on its own, control strings parsed."""
        return [token_id for chunk in marked_chunks(text) if chunk for token_id in self.encode(chunk)]

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for a chat; control strings typed in its messages are encoded as text, and a bos the
        template writes is its one bos (none is added)."""
        return self.encode_marked(self.render_chat_marked(messages, add_generation_prompt))


class GemmaTokenizer(ChatEncoding):
    """Text <-> ids for Gemma 3, with the official chat template.

    `added_tokens` maps extra pieces to ids past the SentencePiece vocabulary: the real Gemma 3 checkpoints
    keep `<image_soft_token>` (id 262144) only in `added_tokens.json`, not in `tokenizer.model`.
    """

    def __init__(self, model_file: str | Path, added_tokens: Mapping[str, int] | None = None) -> None:
        model_file = Path(model_file)
        if not model_file.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {model_file}")
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self._sp_size = self._sp.get_piece_size()
        self._added = dict(added_tokens or {})
        self._added_by_id = {token_id: piece for piece, token_id in self._added.items()}
        self._vocab_size = max([self._sp_size, *(token_id + 1 for token_id in self._added.values())])
        for piece, token_id in self._added.items():
            if token_id < self._sp_size and self._sp.id_to_piece(token_id) != piece:
                raise ValueError(f"added token {piece!r} has id {token_id}, which the SentencePiece model "
                                 f"already uses for {self._sp.id_to_piece(token_id)!r}")

        self._control_ids: dict[str, int] = {}
        for piece in CONTROL_STRINGS:
            token_id = self._lookup(piece)
            if token_id is not None:
                self._control_ids[piece] = token_id
        missing = [piece for piece in REQUIRED_PIECES if piece not in self._control_ids]
        if missing:
            raise ValueError(f"{model_file} is not a Gemma tokenizer: its vocabulary lacks {', '.join(missing)}")
        self._id_to_control = {token_id: piece for piece, token_id in self._control_ids.items()}
        # Longest first, so that no control string is matched by a prefix of a longer one.
        alternatives = sorted(self._control_ids, key=len, reverse=True)
        self._control_pattern = re.compile("(" + "|".join(re.escape(piece) for piece in alternatives) + ")")

    @classmethod
    def from_dir(cls, path: str | Path) -> GemmaTokenizer:
        """Load `tokenizer.model` from a checkpoint directory, plus its `added_tokens.json` if it has one."""
        path = Path(path)
        model_file = path / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"no tokenizer.model in {path} (expected {model_file})")
        added_file = path / "added_tokens.json"
        added = json.loads(added_file.read_text(encoding="utf-8")) if added_file.is_file() else None
        return cls(model_file, added_tokens=added)

    def _lookup(self, piece: str) -> int | None:
        # piece_to_id answers unk_id for pieces it does not know, so check the round trip.
        if piece in self._added:
            return self._added[piece]
        token_id = self._sp.piece_to_id(piece)
        return token_id if self._sp.id_to_piece(token_id) == piece else None

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._control_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._control_ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._control_ids[PAD]

    @property
    def start_of_turn_id(self) -> int:
        return self._control_ids[START_OF_TURN]

    @property
    def end_of_turn_id(self) -> int:
        return self._control_ids[END_OF_TURN]

    @property
    def start_of_image_id(self) -> int | None:
        return self._control_ids.get(START_OF_IMAGE)

    @property
    def end_of_image_id(self) -> int | None:
        return self._control_ids.get(END_OF_IMAGE)

    @property
    def image_token_id(self) -> int | None:
        return self._control_ids.get(IMAGE_SOFT_TOKEN)

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Instruction-tuned Gemma ends its turn with <end_of_turn>; pretrained models end with <eos>."""
        return frozenset({self.eos_id, self.end_of_turn_id})

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Control strings in `text` become their single ids; the text between them goes to SentencePiece.

        `add_bos` does not add a second bos to text that already starts with `<bos>`.
        """
        ids: list[int] = []
        for index, segment in enumerate(self._control_pattern.split(text)):
            if index % 2 == 1:
                ids.append(self._control_ids[segment])
            elif segment:
                ids.extend(self._sp.encode(segment))
        if add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; control pieces are dropped when `skip_special_tokens`, else written out."""
        parts: list[str] = []
        run: list[int] = []  # consecutive ordinary ids, decoded together so byte-fallback pieces join up
        for token_id in ids:
            token_id = int(token_id)
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
            piece = self._id_to_control.get(token_id)
            if piece is None and token_id >= self._sp_size:
                piece = self._added_by_id.get(token_id)
                if piece is None:
                    raise ValueError(f"token id {token_id} has no piece in the vocabulary")
            if piece is None and self._sp.is_control(token_id):
                piece = self._sp.id_to_piece(token_id)
            if piece is None:
                run.append(token_id)
                continue
            if run:
                parts.append(self._sp.decode(run))
                run = []
            if not skip_special_tokens:
                parts.append(piece)
        if run:
            parts.append(self._sp.decode(run))
        return "".join(parts)

    def token_bytes(self) -> tuple[list[bytes], set[int]]:
        """Each id's bytes as it adds them to a text ("▁" a space, "<0x0A>" the byte 10), and the special ids
        (control and added pieces, as their names): the vocabulary as a grammar engine reads it."""
        tokens: list[bytes] = []
        special: set[int] = set()
        for token_id in range(self.vocab_size):
            ordinary = token_id < self._sp_size and token_id not in self._id_to_control and not (
                self._sp.is_control(token_id) or self._sp.is_unknown(token_id))
            if not ordinary:
                special.add(token_id)
                tokens.append((self._id_to_control.get(token_id) or self._added_by_id.get(token_id)
                               or (self._sp.id_to_piece(token_id) if token_id < self._sp_size else "")).encode())
            elif self._sp.is_byte(token_id):
                tokens.append(bytes([int(self._sp.id_to_piece(token_id)[3:5], 16)]))
            else:
                tokens.append(self._sp.id_to_piece(token_id).replace("▁", " ").encode())
        return tokens, special

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """The text google/gemma-3-*-it's chat template renders for `messages` (see `render_gemma3_chat`)."""
        return render_gemma3_chat(messages, add_generation_prompt=add_generation_prompt)

    def mark_controls(self, text: str) -> str:
        """`text` with its control strings cut (see CUT), so that `encode_marked` encodes them as text."""
        return cut_at(text, (m.start() for m in self._control_pattern.finditer(text)))


def render_gemma3_chat(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
    """The text google/gemma-3-*-it's chat template renders for `messages`, for any tokenizer with Gemma's control
    pieces (GemmaTokenizer, and GGUF Gemma vocabularies that carry no template).

    Stricter than the Jinja template: unknown roles and part types, and a conversation with no user
    message, are errors rather than silently rendered or dropped. `image_url` parts count as images.
    """
    _check_roles(messages)
    first_user_prefix = ""
    turns = list(enumerate(messages))
    if messages[0]["role"] == "system":
        first_user_prefix = _system_text(messages[0]["content"]) + "\n\n"
        turns = turns[1:]

    out = [BOS]
    for turn_index, (index, message) in enumerate(turns):
        role = "model" if message["role"] == "assistant" else message["role"]
        out.append(f"{START_OF_TURN}{role}\n")
        if turn_index == 0:
            out.append(first_user_prefix)
        out.append(_content_text(message["content"], index))
        out.append(f"{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


def _check_roles(messages: Sequence[Mapping[str, Any]]) -> None:
    """Gemma was tuned on user/model turns that strictly alternate, after at most one system prompt."""
    if len(messages) == 0:
        raise ChatTemplateError("conversation is empty; it needs at least one user message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        role = message["role"]
        if role not in ROLES:
            raise ChatTemplateError(f"message {index} has unknown role {role!r}; "
                                    f"expected one of {', '.join(map(repr, ROLES))}")
        if role == "system" and index > 0:
            raise ChatTemplateError(f"message {index} is a system message; only the first message may be one")

    start = 1 if messages[0]["role"] == "system" else 0
    if start == len(messages):
        raise ChatTemplateError("conversation has a system message but no user message")
    for index in range(start, len(messages)):
        expected = "user" if (index - start) % 2 == 0 else "assistant"
        role = messages[index]["role"]
        if role != expected and index == start:
            raise ChatTemplateError("conversation roles must alternate user/assistant/user/...; "
                                    f"message {index} has role {role!r} but the first turn must be 'user'")
        if role != expected:
            raise ChatTemplateError("conversation roles must alternate user/assistant/user/...; "
                                    f"message {index} has role {role!r} after {messages[index - 1]['role']!r}")


def _parts(content: Any, index: int) -> list[Mapping[str, Any]]:
    if not isinstance(content, list):
        raise ChatTemplateError(f"message {index} content must be a string or a list of parts, "
                                f"got {type(content).__name__}")
    for part_index, part in enumerate(content):
        where = f"message {index} content part {part_index}"
        if not isinstance(part, Mapping) or "type" not in part:
            raise ChatTemplateError(f"{where} must be a dict with a 'type', got {part!r}")
        if part["type"] == "text":
            if not isinstance(part.get("text"), str):
                raise ChatTemplateError(f"{where} is a text part without a string 'text'")
        elif part["type"] not in IMAGE_PART_TYPES:
            raise ChatTemplateError(f"{where} has unknown type {part['type']!r}; "
                                    "expected 'text', 'image' or 'image_url'")
    return content


def _content_text(content: Any, index: int) -> str:
    """A turn's body: strings are trimmed, as the template's `| trim` does; images become <start_of_image>."""
    if isinstance(content, str):
        return content.strip()
    return "".join(part["text"].strip() if part["type"] == "text" else START_OF_IMAGE
                   for part in _parts(content, index))


def _system_text(content: Any) -> str:
    """The system prompt, untrimmed, as the template folds it into the first user turn."""
    if isinstance(content, str):
        return content
    parts = _parts(content, 0)
    if any(part["type"] != "text" for part in parts):
        raise ChatTemplateError("message 0 is a system message; it may contain only text parts")
    return "".join(part["text"] for part in parts)


DEMO_CORPUS = [
    "Hello! How can I help you today?",
    "The weather this morning is cool and a little cloudy, with rain expected after lunch.",
    "Please write a short poem about the sea and the moon.",
    "A good cup of tea needs fresh water, a warm pot and about four minutes of patience.",
    "The train to the city leaves at 7:45 and arrives at 9:10.",
    "Tensor product attention stores keys and values as small factors instead of full heads.",
    "The model reads the prompt, fills its cache, and then writes one token at a time.",
    "Can you explain how a binary search works?",
    "Sure. You look at the middle item, compare it with the target, and drop the half that cannot hold it.",
    "My sister planted tomatoes, beans and sunflowers in the garden behind the house.",
    "There are 365 days in a year, or 366 in a leap year.",
    "What is the capital of France? The capital of France is Paris.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The library opens at nine, but the reading room stays quiet until ten.",
    "He counted the coins twice: 12, 25, 50, and then 100 in total.",
    "Thank you very much, that was really helpful.",
    "I am not sure about that; let me think again and check the numbers.",
    "The old bridge was painted red last summer, and now it glows at sunset.",
    "Always keep a backup of your files before you update the system.",
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i * i)",
    "Cats sleep for most of the day and hunt at night.",
    "The recipe asks for two eggs, a cup of flour and a pinch of salt.",
    "Mountains in the north are covered with snow from November to April.",
    "A small robot rolled across the kitchen floor, looking for crumbs.",
    "Questions are welcome; answers are sometimes slower.",
    "She finished the marathon in 3 hours, 41 minutes and 8 seconds.",
    "The museum shows paintings, maps, clocks and a very large whale skeleton.",
    "Could you translate this sentence into Spanish for me?",
    "Of course. Here is a simple plan: read, write, test, and repeat.",
    "Light from the sun takes about eight minutes to reach the Earth.",
    "The children built a castle of sand, and the tide took it away by evening.",
    "Good morning, everyone. Today we will talk about memory and speed.",
    "If the cache is full, the oldest entries are dropped first.",
    "Numbers like 3.14, 2.71 and 1.41 appear everywhere in science.",
    "The shop on the corner sells bread, cheese, apples and fresh flowers.",
    "Goodbye for now, and have a wonderful evening!",
]


def train_sentencepiece(out_path: str | Path, sentences: Iterable[str], vocab_size: int = 512) -> Path:
    """Train a tiny SentencePiece model laid out like Gemma's, so tests and the demo need no download.

    BPE with byte fallback, digits split, no dummy prefix and no whitespace normalization, like Gemma's
    `tokenizer.model`; `vocab_size` is an upper bound (`hard_vocab_limit=False`) so small corpora train.
    """
    out_path = Path(out_path)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece=PAD,
        eos_piece=EOS,
        bos_piece=BOS,
        unk_piece=UNK,
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,  # one thread keeps the result identical run to run
        minloglevel=2,  # warnings and errors only
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(buffer.getvalue())
    return out_path
