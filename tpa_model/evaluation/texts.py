"""Held-out English prose for quality measurements: the Python 3.11 documentation, as Debian packages it.

Nobody here wrote it, it installs offline from the Debian mirror (`python3.11-doc`, about 13 MB), and it is
plain technical English, so perplexity and retrieval on it mean something for any English model. On first use
`apt-get download` fetches the package into a temporary folder, `dpkg-deb -x` unpacks it, every
reStructuredText source under usr/share/doc/python3.11/html/_sources/ is turned into prose paragraphs
(directives, code, tables and markup dropped), and the result is cached as one JSON file in $GEMMA_TPA_TEXTS
(default $GEMMA_TPA_CACHE/texts, and ~/.cache/gemma-tpa/texts without either).

The split is by file, fixed by a hash of the file's path (see `split_of`): about one file in five
(`EVAL_SHARE`) is evaluation text, the rest is calibration text, and the few paragraphs that occur on both
sides are dropped from the eval side. Whoever calibrates or heals a model reads `documents("calibration")`
and so never sees a paragraph that `tpa_model.evaluation.quality` evaluates on. With python3.11-doc 3.11.2, 105 of the
491 files with prose are on the eval side (about 280k SmolLM2 tokens), 386 on the calibration side (about
980k); `python -m tpa_model.texts --list eval` (or `--list calibration`) prints which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

PACKAGE = "python3.11-doc"
SOURCES = "usr/share/doc/python3.11/html/_sources"
CONVERTER_VERSION = 1  # bump when rst_to_paragraphs changes: the cached file is rebuilt
EVAL_SHARE = 5  # one file in EVAL_SHARE is evaluation text
SPLITS = ("eval", "calibration")


class TextsUnavailable(RuntimeError):
    """The evaluation text could not be fetched or unpacked (no apt, no mirror, a broken package)."""


def texts_dir() -> Path:
    if os.environ.get("GEMMA_TPA_TEXTS"):
        return Path(os.environ["GEMMA_TPA_TEXTS"])
    root = Path(os.environ.get("GEMMA_TPA_CACHE", Path.home() / ".cache" / "gemma-tpa"))
    return root / "texts"


def cache_file() -> Path:
    return texts_dir() / f"{PACKAGE}-prose-v{CONVERTER_VERSION}.json"


# -- reStructuredText -> prose -----------------------------------------------------------------------------

# Directives whose indented body is prose about the thing they declare; every other directive's body (code,
# tables, indexes, options, includes) is dropped.
PROSE_DIRECTIVES = frozenset("""
    function method classmethod staticmethod abstractmethod decorator decoratormethod coroutinefunction
    coroutinemethod class attribute data exception describe object property module-data opcode pdbcommand
    cmdoption option envvar c:function c:member c:type c:var c:macro c:data versionadded versionchanged
    deprecated deprecated-removed note warning seealso important caution tip hint attention danger topic
    sidebar impl-detail admonition
""".split())

_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::")
_UNDERLINE = re.compile(r"([=\-~^\"'`#*+<>_.:])\1{2,}")
_TABLE_BORDER = re.compile(r"(\+[-=+]+\+|=+( +=+)+)")
_BULLET = re.compile(r"([-*+]|#\.|\d+\.|\(?[a-z0-9]\)) +")
_FIELD = re.compile(r":[\w -]+:( |$)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _markup_line(stripped: str, indent: int) -> tuple[str | None, int | None]:
    """(text to keep, indentation whose deeper lines to skip) for one non-blank line."""
    if stripped.startswith(".."):  # a directive, comment, target or footnote
        match = _DIRECTIVE.match(stripped)
        return None, None if match and match.group(1) in PROSE_DIRECTIVES else indent
    if stripped.endswith("::"):  # a literal block follows; "Example::" reads "Example:"
        text = stripped[:-2].rstrip()
        return (text + ":" if text and not stripped.endswith(" ::") else text), indent
    if _FIELD.match(stripped) or _UNDERLINE.fullmatch(stripped):
        return None, None
    return stripped, None


def _prose_lines(rst: str) -> list[str]:
    """Lines of prose with blank lines between paragraphs; literal blocks and non-prose directives removed."""
    out: list[str] = []
    skip_deeper = None
    previous = ""
    for raw in rst.splitlines():
        line = raw.rstrip()
        if skip_deeper is not None and (not line or _indent(line) > skip_deeper):
            out.append("")  # what follows a skipped block is a paragraph of its own
            continue
        skip_deeper = None
        stripped = line.strip()
        if _UNDERLINE.fullmatch(stripped) and out and out[-1] == previous.strip() and previous.strip():
            out.pop()  # the section title above its underline
        text, skip_deeper = _markup_line(stripped, _indent(line)) if stripped else ("", None)
        bullet = _BULLET.match(text or "")
        if bullet:  # a list item starts a paragraph of its own
            out.append("")
            text = text[bullet.end():]
        out.append("" if text is None else text)
        previous = line
    return out


_ROLE = re.compile(r":([\w:.+-]+):`([^`]*)`")
_LITERAL = re.compile(r"``(.+?)``")
_MARKUP = [
    (re.compile(r"`([^`<]*?)\s*<[^>`]*>`__?"), r"\1"),
    (re.compile(r"`([^`]*)`__?"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\s*\[(#\w*|\d+|\*)\]_"), ""),
    (re.compile(r"\|([\w -]+)\|"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
    (re.compile(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])"), r"\1"),
    (re.compile(r"\\ "), ""),
    (re.compile(r"\\(.)"), r"\1"),
]


def _role_text(match: re.Match) -> str:
    """:func:`~os.path.join` reads "join", :ref:`the tutorial <tut-x>` "the tutorial", :pep:`8` "PEP 8";
    a bare cross-reference label (whose title Sphinx would look up) reads as its words."""
    role, text = match.group(1), match.group(2)
    label = re.fullmatch(r"(.*?)\s*<[^>]*>", text, re.S)
    if label:
        return label.group(1)
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    if role in ("issue", "gh"):
        return f"{'bpo' if role == 'issue' else 'gh'}-{text}"
    if role in ("ref", "doc"):
        return re.sub(r"[-_/]+", " ", text.rsplit("/", 1)[-1])
    text = text.lstrip("!")
    return text[1:].rsplit(".", 1)[-1] if text.startswith("~") else text


def _clean_markup(text: str) -> str:
    text = _ROLE.sub(_role_text, text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text


def clean_inline(text: str) -> str:
    """Inline markup (roles, links, emphasis, escapes, footnote references) reduced to its words; ``literals``
    keep their text as written (a backslash in a literal is a backslash)."""
    parts = _LITERAL.split(text)  # odd parts are the literals' contents
    text = "".join(p if i % 2 else _clean_markup(p) for i, p in enumerate(parts))
    return re.sub(r"\s+", " ", text).strip()


_SENTENCE_END = re.compile(r"[.?!:][)\"']?$")
_LEFTOVER = re.compile(r"::|>>>|`|^\.\.|\|\s*\||\s_\w")


def is_prose(paragraph: str, min_words: int = 8) -> bool:
    """Full English sentences only: enough words, a capital start, a sentence end, mostly letters."""
    if len(paragraph.split()) < min_words or not _SENTENCE_END.search(paragraph) or _LEFTOVER.search(paragraph):
        return False
    if not (paragraph[0].isupper() or paragraph[0] in "\"'("):
        return False
    visible = [c for c in paragraph if not c.isspace()]
    return sum(c.isalpha() for c in visible) >= 0.75 * len(visible)


def rst_to_paragraphs(rst: str) -> list[str]:
    """The prose paragraphs of one reStructuredText document, each on one line."""
    paragraphs: list[list[str]] = [[]]
    for line in _prose_lines(rst):
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    blocks = [lines for lines in paragraphs if lines and not any(_TABLE_BORDER.fullmatch(x) for x in lines)]
    cleaned = (clean_inline(" ".join(lines)) for lines in blocks if not lines[0].startswith(">>>"))
    return [p for p in cleaned if is_prose(p)]


# -- fetching ----------------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def _download(tmp: Path) -> Path:
    """apt-get download the package into tmp; on a machine whose apt lists are missing, root updates them once."""
    tmp.chmod(0o755)  # apt's sandbox user writes the file
    result = _run(["apt-get", "download", PACKAGE], tmp)
    if result.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
        print(f"apt-get cannot find {PACKAGE}; running apt-get update once", file=sys.stderr, flush=True)
        _run(["apt-get", "update", "-qq"], tmp)
        result = _run(["apt-get", "download", PACKAGE], tmp)
    debs = sorted(tmp.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise TextsUnavailable(f"`apt-get download {PACKAGE}` failed: {result.stderr.strip()[-500:]}. "
                               "Run `apt-get update` (as root) and try again.")
    return debs[0]


def _unpack(deb: Path, tmp: Path) -> tuple[Path, str]:
    """(the rst sources folder, the package version) of a downloaded .deb."""
    result = _run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], tmp)
    sources = tmp / "root" / SOURCES
    if result.returncode != 0 or not sources.is_dir():
        raise TextsUnavailable(f"`dpkg-deb -x {deb.name}` gave no {SOURCES}: {result.stderr.strip()[-500:]}")
    version = _run(["dpkg-deb", "-f", str(deb), "Version"], tmp).stdout.strip()
    return sources, version


def _convert(sources: Path) -> dict[str, list[str]]:
    """Relative path (without .rst.txt) -> prose paragraphs, for every source with any prose."""
    documents = {}
    for path in sorted(sources.rglob("*.rst.txt")):
        paragraphs = rst_to_paragraphs(path.read_text(encoding="utf-8", errors="replace"))
        if paragraphs:
            documents[path.relative_to(sources).as_posix().removesuffix(".rst.txt")] = paragraphs
    return documents


def fetch(target: Path | None = None) -> Path:
    """Download, unpack and convert the documentation into the cache file (written atomically)."""
    target = target or cache_file()
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise TextsUnavailable(
            f"the evaluation text is Debian's {PACKAGE} package, fetched with apt-get and dpkg-deb, and this machine "
            f"lacks {' and '.join(missing)}. Fetch it on a Debian or Ubuntu machine (python -m tpa_model.texts) "
            f"and copy {target.name} into {target.parent}."
        )
    print(f"fetching {PACKAGE} from the Debian mirror into {target.parent} (first use)...", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        sources, version = _unpack(_download(Path(tmp)), Path(tmp))
        data = {"package": PACKAGE, "version": version, "converter": CONVERTER_VERSION, "documents": _convert(sources)}
        partial = Path(tmp) / target.name
        partial.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        os.replace(partial, target)
    return target


@lru_cache(maxsize=4)
def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def corpus() -> dict:
    """The cached corpus ({package, version, converter, documents}), fetched on first use."""
    path = cache_file()
    if not path.is_file():
        fetch(path)
    return _load(path)


def source_name() -> str:
    """What the text is, for reports: package and version."""
    data = corpus()
    return f"Python 3.11 documentation (Debian {data['package']} {data['version']})"


# -- the split ---------------------------------------------------------------------------------------------


def _path_hash(path: str) -> int:
    return int.from_bytes(hashlib.sha256(path.encode("utf-8")).digest()[:8], "big")


def split_of(path: str) -> str:
    """'eval' or 'calibration' for a document path such as 'library/functools': fixed by the path alone, so
    the split never depends on the package version, the machine or the order files are read in."""
    return "eval" if _path_hash(path) % EVAL_SHARE == 0 else "calibration"


def split_files(split: str) -> list[str]:
    """The documents of one side of the split, in a fixed order that mixes topics (by hash), so that the
    first few documents of a side are not all from one part of the manual."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return sorted((p for p in corpus()["documents"] if split_of(p) == split), key=_path_hash)


def documents(split: str) -> dict[str, str]:
    """Document path -> its prose (paragraphs separated by blank lines), in split_files order. A paragraph that
    also appears in a calibration document (the release notes repeat some) is left out of the eval side, so
    the two sides share no paragraph at all."""
    docs = corpus()["documents"]
    if split == "calibration":
        return {path: "\n\n".join(docs[path]) for path in split_files(split)}
    seen = {p for path in split_files("calibration") for p in docs[path]}
    kept = {path: [p for p in docs[path] if p not in seen] for path in split_files(split)}
    return {path: "\n\n".join(paragraphs) for path, paragraphs in kept.items() if paragraphs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tpa_model.texts",
                                     description=f"Fetch the held-out text ({PACKAGE}) and show its split.")
    parser.add_argument("--list", choices=SPLITS, help="print the documents of one side, one per line")
    args = parser.parse_args(argv)
    try:
        docs = {split: documents(split) for split in SPLITS}
    except TextsUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.list:
        print("\n".join(docs[args.list]))
        return 0
    print(f"{source_name()}, cached in {cache_file()}")
    for split, texts in docs.items():
        print(f"{split}: {len(texts)} documents, {sum(len(t) for t in texts.values())} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
