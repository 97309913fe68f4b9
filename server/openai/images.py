"""The images of a chat request: data URLs, or http(s) URLs fetched safely, then decoded off the event loop.

Image URLs come from clients, so a fetch is a request the server makes on a stranger's behalf (SSRF). The
rules, each checked in `ImageLoader`:
- only http and https; a malformed URL is the client's 400, naming the field;
- every address a host name resolves to must be public (not loopback, private, link-local, multicast,
  reserved, unspecified, or a cloud metadata address), unless `allow_private`; numeric host forms
  (2130706433, 0x7f.1, [::ffff:127.0.0.1], 6to4, NAT64) are resolved and unwrapped before the check;
- the connection goes to the address that was checked (see `pinned_request`), so a second DNS answer
  cannot point it elsewhere (DNS rebinding);
- redirects are followed here, a bounded number, each hop checked like the first;
- one deadline covers the whole fetch (DNS, connect, reads, redirects), and a fetch ends with its request;
- whatever went wrong, the client reads one message, "could not fetch image N", so the server cannot be
  used to learn what answered where (a port scanner); the details go to the server's log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import ipaddress
import logging
import socket
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from PIL import Image

from tpa_model.model.image_processing import ImageError, TooManyPixelsError, load_image

from .protocol import APIError

log = logging.getLogger(__name__)

DATA_PREFIX = "data:"
MAX_URL_LENGTH = 8192  # for http(s) URLs; data URLs are bounded by the image byte limit instead
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
METADATA_ADDRESSES = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                      ipaddress.ip_address("100.100.100.200")}  # AWS/GCP/Azure, AWS IPv6, Alibaba
NAT64 = ipaddress.ip_network("64:ff9b::/96")
CGNAT = ipaddress.ip_network("100.64.0.0/10")


@dataclass
class ImageLimits:
    """What one request's images may cost; the defaults are tpa-serve's flag defaults."""

    allow_remote: bool = True
    allow_private: bool = False  # --allow-private-image-urls
    max_bytes: int = 20 << 20  # per image, fetched or decoded from base64
    max_images: int = 8  # --max-images-per-request
    max_pixels: int = 50_000_000  # --max-image-pixels: decoded pixels of all of a request's images together
    fetch_timeout: float = 10.0  # --image-fetch-timeout: the whole fetch of one image, redirects included
    max_fetches: int = 32  # --max-concurrent-image-fetches: remote images being fetched at once, server-wide
    max_redirects: int = 5


class FetchFailed(Exception):
    """A remote image could not be fetched; the message is for the log only, never for the client."""


# -- addresses -------------------------------------------------------------------------------------------


def is_public_address(text: str) -> bool:
    """Whether an address may be fetched from without --allow-private-image-urls. IPv6 forms that carry an
    IPv4 address (mapped, 6to4, NAT64) are judged by that address."""
    ip = ipaddress.ip_address(text)
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(str(embedded))
        if ip.is_site_local:
            return False
    if ip in METADATA_ADDRESSES or (ip.version == 4 and ip in CGNAT):
        return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def lookup(host: str, port: int) -> list[str]:
    """Every address the host resolves to (the system resolver; numeric forms such as 2130706433 too)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


# -- URLs ------------------------------------------------------------------------------------------------


def parse_url(url: str) -> httpx.URL:
    """An http(s) URL with a host and a valid port, or ValueError saying what is wrong with it."""
    if len(url) > MAX_URL_LENGTH:
        raise ValueError(f"the URL is longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError) as e:  # InvalidURL is not an httpx.HTTPError
        raise ValueError(f"the URL is malformed ({e})") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError("image_url must be a data: URL or an http(s) URL")
    if not parsed.raw_host:
        raise ValueError("the URL has no host")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ValueError(f"the URL's port {parsed.port} is not between 1 and 65535")
    return parsed


def default_port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def pinned_request(client: httpx.AsyncClient, url: httpx.URL, address: str) -> httpx.Request:
    """A GET of `url` that connects to `address`, the one we checked, and never resolves the name again.

    The URL's host is replaced by the address, and the name goes where servers read it: the Host header, and
    for https the TLS server name (httpcore's `sni_hostname` extension), which is also the name the
    certificate is verified against. This uses only public httpx API, unlike swapping in a resolving
    network backend, and works the same through every connection httpx opens. Proxies are off
    (trust_env=False on the client): a proxy would resolve the name itself.
    """
    host = url.raw_host.decode("ascii")
    extensions = {}
    if url.scheme == "https" and not is_ip_literal(host):
        extensions["sni_hostname"] = host
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    return client.build_request("GET", url.copy_with(host=address), headers=headers, extensions=extensions)


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# -- data URLs -------------------------------------------------------------------------------------------


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise APIError(400, "image data URLs must look like data:image/png;base64,...", param="messages")
    if not header[len(DATA_PREFIX):].startswith("image/"):
        raise APIError(400, f"data URL media type {header[5:].split(';')[0][:100]!r} is not an image",
                       param="messages")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(400, f"image is larger than the limit of {max_bytes} bytes", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"image data URL is not valid base64: {e}", param="messages") from e


# -- decoding --------------------------------------------------------------------------------------------


def header_pixels(data: bytes) -> int:
    """Width x height from the header alone (Image.open decodes no pixels); 0 when there is no readable
    header, which load_image then reports precisely."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return image.width * image.height
    except Image.DecompressionBombError as e:
        raise TooManyPixelsError(f"image is too large: {e}") from e
    except Exception:
        return 0


def decode_images(blobs: list[bytes], max_pixels: int) -> list[Image.Image]:
    """RGB images, or a 400: the pixels of all of them together are checked from their headers before any
    is decoded, so a few small files cannot expand into gigabytes. Runs in a worker thread."""
    try:
        total = sum(header_pixels(b) for b in blobs)
        if total > max_pixels:
            raise TooManyPixelsError(f"the request's images have {total} pixels together, more than the limit "
                                     f"of {max_pixels}")
        return [load_image(b, max_pixels=max_pixels) for b in blobs]
    except ImageError as e:
        raise APIError(400, str(e), param="messages", code=e.code) from e
    except Exception as e:  # a decoder bug must still be the client's 400 about its image, not our 500
        log.warning("image decoding failed: %r", e)
        raise APIError(400, "an image could not be decoded", param="messages", code="invalid_image") from e


# -- the loader ------------------------------------------------------------------------------------------


class FetchSlots:
    """A server-wide bound on remote images being fetched at once. A request whose fetches do not fit is
    refused with a 503 and Retry-After, like a full queue, instead of waiting: fetches do not pile up."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    @contextlib.contextmanager
    def take(self, count: int):
        if count and self.used + count > self.limit:
            raise APIError(503, f"{self.used} remote images are being fetched (limit {self.limit}); retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})
        self.used += count
        try:
            yield
        finally:
            self.used -= count


class ImageLoader:
    """A request's image URLs -> decoded RGB images, within `limits`. One per server (it owns the slots)."""

    def __init__(self, limits: ImageLimits):
        self.limits = limits
        self.slots = FetchSlots(limits.max_fetches)

    async def load(self, urls: list[str], is_disconnected: Callable[[], Awaitable[bool]]) -> list[Image.Image]:
        """Fetched concurrently; if the client goes away first, the fetches are cancelled (a 499 nobody reads).
        Decoding runs in a worker thread, so a heavy image never blocks the event loop (or /health)."""
        if len(urls) > self.limits.max_images:
            raise APIError(400, f"a request may have at most {self.limits.max_images} images, got {len(urls)}",
                           param="messages", code="too_many_images")
        task = asyncio.ensure_future(self.fetch_all(urls))
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await is_disconnected():
                    raise APIError(499, "the client closed the request")
            blobs = task.result()
        finally:
            await cancel_and_wait([task])
        return await asyncio.to_thread(decode_images, blobs, self.limits.max_pixels)

    async def fetch_all(self, urls: list[str]) -> list[bytes]:
        """Every image's bytes; the first failure cancels the other fetches."""
        remote = sum(not u.startswith(DATA_PREFIX) for u in urls)
        with self.slots.take(remote):
            tasks = [asyncio.ensure_future(self.fetch(u, i + 1)) for i, u in enumerate(urls)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                await cancel_and_wait(tasks)

    async def fetch(self, url: str, number: int) -> bytes:
        """The bytes behind one image_url. Malformed URLs and limits get precise 400s; every failure of the
        fetch itself, a refused address included, gets the same message."""
        if url.startswith(DATA_PREFIX):
            return decode_data_url(url, self.limits.max_bytes)
        try:
            target = parse_url(url)
        except ValueError as e:
            raise APIError(400, f"image {number}: {e}", param="messages", code="invalid_image_url") from None
        if not self.limits.allow_remote:
            raise APIError(400, "fetching remote images is turned off on this server; send a data: URL",
                           param="messages")
        try:
            return await asyncio.wait_for(self.download(target), self.limits.fetch_timeout)
        except APIError:
            raise
        except Exception as e:  # refused, unreachable, timed out, a bad answer: the client reads the same
            log.warning("image %d: fetching %.200s failed: %s", number, url, describe(e))
            raise APIError(400, f"could not fetch image {number} of the request", param="messages",
                           code="image_fetch_failed") from None

    async def download(self, url: httpx.URL) -> bytes:
        """GET, following redirects here so that every hop's addresses are checked before connecting."""
        async with httpx.AsyncClient(trust_env=False, timeout=self.limits.fetch_timeout) as client:
            for _ in range(self.limits.max_redirects + 1):
                address = await self.checked_address(url)
                response = await client.send(pinned_request(client, url, address), stream=True)
                try:
                    location = response.headers.get("location")
                    if response.status_code not in REDIRECT_STATUSES or location is None:
                        return await self.read_body(response)
                finally:
                    await response.aclose()
                try:
                    url = parse_url(str(url.join(location)))
                except ValueError as e:
                    raise FetchFailed(f"redirect to a bad URL: {e}") from None
        raise FetchFailed(f"more than {self.limits.max_redirects} redirects")

    async def checked_address(self, url: httpx.URL) -> str:
        """The address to connect to: the first the host resolves to, once all of them are allowed."""
        host = url.raw_host.decode("ascii")
        addresses = await lookup(host, default_port(url))
        if not addresses:
            raise FetchFailed(f"{host} resolves to no address")
        if not self.limits.allow_private:
            refused = [a for a in addresses if not is_public_address(a)]
            if refused:
                raise FetchFailed(f"{host} resolves to {refused[0]}, which is not a public address "
                                  f"(--allow-private-image-urls allows it)")
        return addresses[0]

    async def read_body(self, response: httpx.Response) -> bytes:
        """The body of a 200, stopped as soon as it passes the byte limit (the only error the client sees in
        detail: it is about the image, not about what answered). Only unencoded bodies: we ask for identity,
        and a gzip or brotli body could expand a thousandfold in one chunk before the limit is checked."""
        if response.status_code != 200:
            raise FetchFailed(f"HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise FetchFailed(f"the body is {encoding}-encoded")
        limit = self.limits.max_bytes
        data = bytearray()
        async for piece in response.aiter_raw():
            data += piece
            if len(data) > limit:
                raise APIError(400, f"an image is larger than the limit of {limit} bytes", param="messages",
                               code="image_too_large")
        return bytes(data)


async def cancel_and_wait(tasks: list[asyncio.Future]) -> None:
    """Cancel what is still running and wait until it has ended, so its connections are closed and its fetch
    slots are free before the caller goes on."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending)


def describe(error: BaseException) -> str:
    """For the log: the exception's type and text (asyncio's timeout has no text)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
