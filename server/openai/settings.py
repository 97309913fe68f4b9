"""What the server is told at start-up: the model's name and length, the API key, and the limits on
requests, images and streams. tpa-serve's flags fill it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .images import ImageLimits


@dataclass
class ServerSettings:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allow_remote_images: bool = True
    allow_private_image_urls: bool = False
    max_image_bytes: int = 20 << 20
    max_images_per_request: int = 8
    max_image_pixels: int = 50_000_000  # decoded pixels of all of a request's images together
    image_fetch_timeout: float = 10.0
    max_concurrent_image_fetches: int = 32
    drain_timeout: float = 30.0
    max_request_bytes: int = 32 << 20  # a request body, images in data URLs included
    max_text_chars: int = 1_000_000  # characters of a request's text (messages, or each prompt), before tokenizing
    body_timeout: float = 30.0  # seconds for a request's whole body to arrive
    docs: bool = True  # serve /docs, /redoc and /openapi.json (behind the API key when one is set)
    stream_timeout: float = 60.0  # seconds a streaming client may leave a write blocked before it is cut off

    def image_limits(self) -> ImageLimits:
        return ImageLimits(allow_remote=self.allow_remote_images, allow_private=self.allow_private_image_urls,
                           max_bytes=self.max_image_bytes, max_images=self.max_images_per_request,
                           max_pixels=self.max_image_pixels, fetch_timeout=self.image_fetch_timeout,
                           max_fetches=self.max_concurrent_image_fetches)
