"""Fetching the images of a chat request: data URLs, or http(s) URLs when remote fetching is on."""

from __future__ import annotations

import base64
import binascii

import httpx

from .protocol import APIError

DATA_PREFIX = "data:"


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise APIError(400, "image data URLs must look like data:image/png;base64,...", param="messages")
    if not header[len(DATA_PREFIX):].startswith("image/"):
        raise APIError(400, f"data URL media type {header[5:].split(';')[0]!r} is not an image", param="messages")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(400, f"image is larger than the limit of {max_bytes} bytes", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image data URL is not valid base64: {e}", param="messages") from e


async def fetch_image(url: str, *, allow_remote: bool, max_bytes: int, timeout: float) -> bytes:
    """The bytes behind an image_url, with a size limit checked while downloading."""
    if url.startswith(DATA_PREFIX):
        return decode_data_url(url, max_bytes)
    if not url.startswith(("http://", "https://")):
        raise APIError(400, "image_url must be a data: URL or an http(s) URL", param="messages")
    if not allow_remote:
        raise APIError(400, "fetching remote images is turned off on this server; send a data: URL",
                       param="messages")
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=True) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise APIError(400, f"fetching {url} gave HTTP {response.status_code}", param="messages")
                data = bytearray()
                async for piece in response.aiter_bytes():
                    data += piece
                    if len(data) > max_bytes:
                        raise APIError(400, f"image at {url} is larger than {max_bytes} bytes", param="messages")
                return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, f"could not fetch image {url}: {e}", param="messages") from e
