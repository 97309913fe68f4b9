"""/v1/models: the one model this server serves, under its served name, with its context length."""

from __future__ import annotations

from typing import Any

from .protocol import now
from .settings import ServerSettings


class OpenAIServingModels:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.created = now()

    def show_models(self) -> dict[str, Any]:
        card = {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "gemma-tpa", "max_model_len": self.settings.max_model_len}
        return {"object": "list", "data": [card]}
