"""Image URLs and image bytes from hostile clients: SSRF refusals, malformed URLs, deadlines, limits, decoding.

A real HTTP server on loopback stands in for the hosts image URLs point at. Loopback is private, so the
default server refuses it; --allow-private-image-urls lets the positive cases through. A "public" host is
simulated where needed by a resolver that maps a name to 127.0.0.2 and a check that calls that address public.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import os
import socket
import struct
import threading
import time
import zlib
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import MODEL, LiveServer
from PIL import Image

from server.openai import images
from server.openai.images import ImageLimits, ImageLoader, decode_images, is_public_address, parse_url
from server.openai.protocol import APIError
from tpa_model.model.image_processing import ImageProcessorConfig, preprocess

GENERIC = "could not fetch image 1 of the request"


def png_bytes(size=(30, 40), mode="RGB", fmt="PNG", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **save)
    return buf.getvalue()


def data_url(data: bytes, media="image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one compressed row: a bomb's header, in 70 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


# -- a real image host on loopback -----------------------------------------------------------------------


class ImageHost:
    """A threaded HTTP server on `address`: /pic.png, /redirect?to=URL, /slow-redirect?to=URL, /hang (accepts,
    never answers), /drip (a 200 that sends a byte every 0.2 s), /big, /missing. It records every request's
    path and Host header, and whether the client closed a /hang connection."""

    def __init__(self, address="127.0.0.1"):
        import http.server

        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                host.hits.append((self.path, self.headers.get("Host")))
                route = urlparse(self.path)
                getattr(self, "route_" + route.path.strip("/").replace("-", "_").replace(".", "_"),
                        self.route_missing)(parse_qs(route.query))

            def route_pic_png(self, _):
                self.reply(200, png_bytes())

            def route_big(self, _):
                self.reply(200, b"\0" * 5000)

            def route_gzip(self, _):
                body = gzip.compress(b"\0" * (10 << 20))  # 10 KiB on the wire, 10 MiB decoded
                self.send_response(200)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def route_redirect(self, query):
                self.send_response(302)
                self.send_header("Location", query["to"][0])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def route_slow_redirect(self, query):
                time.sleep(0.4)
                self.route_redirect(query)

            def route_hang(self, _):
                self.connection.settimeout(0.05)
                deadline = time.time() + 30
                while time.time() < deadline:
                    try:
                        if self.connection.recv(1) == b"":
                            host.closed.set()
                            return
                    except OSError:  # a timeout too
                        continue

            def route_drip(self, _):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                for _ in range(150):
                    try:
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    except OSError:
                        return
                    time.sleep(0.2)

            def route_missing(self, _):
                self.reply(404, b"not here")

            def reply(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.hits: list[tuple[str, str]] = []
        self.closed = threading.Event()
        self.httpd = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{address}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def host():
    h = ImageHost()
    yield h
    h.stop()


@pytest.fixture
def public_host(monkeypatch):
    """A host reached by the name public.test, at 127.0.0.2, which the address check is told is public."""
    h = ImageHost("127.0.0.2")
    real_lookup, real_check = images.lookup, images.is_public_address

    async def lookup(name, port):
        return ["127.0.0.2"] if name == "public.test" else await real_lookup(name, port)

    monkeypatch.setattr(images, "lookup", lookup)
    monkeypatch.setattr(images, "is_public_address", lambda a: a == "127.0.0.2" or real_check(a))
    yield h
    h.stop()


async def connected() -> bool:
    return False


def load(urls, **limits) -> list[Image.Image]:
    return asyncio.run(ImageLoader(ImageLimits(**limits)).load(urls, connected))


def refused(urls, **limits) -> APIError:
    with pytest.raises(APIError) as info:
        load(urls, **limits)
    return info.value


# -- addresses -------------------------------------------------------------------------------------------

NOT_PUBLIC = ["127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "169.254.0.1",
              "100.100.100.200", "100.64.0.1", "0.0.0.0", "224.0.0.1", "239.255.255.250", "255.255.255.255",
              "240.0.0.1", "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "fd00:ec2::254", "ff02::1", "ff0e::1",
              "fec0::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::",
              "2002:a9fe:a9fe::", "64:ff9b::a9fe:a9fe", "64:ff9b::7f00:1", "2001:db8::1"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_private_link_local_multicast_metadata_addresses_are_not_public(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111",
                                     "::ffff:8.8.8.8", "64:ff9b::808:808"])
def test_public_addresses_are_public(address):
    assert is_public_address(address)


@pytest.mark.parametrize("form", ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.1", "017700000001", "127.1",
                                  "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::1]", "localhost"])
def test_loopback_in_any_form_is_refused_without_connecting(host, form):
    """Numeric forms are resolved as the system resolver reads them, then checked: nothing reaches the host."""
    err = refused([f"http://{form}:{host.port}/pic.png"])
    assert (err.status, err.message, err.param, err.code) == (400, GENERIC, "messages", "image_fetch_failed")
    assert host.hits == []


def test_every_resolved_address_is_checked(host, monkeypatch):
    """One private address among public ones refuses the name (a resolver may hand out either)."""
    async def lookup(name, port):
        return ["8.8.8.8", "10.0.0.1"]

    monkeypatch.setattr(images, "lookup", lookup)
    assert refused(["http://mixed.test/pic.png"]).message == GENERIC


def test_loopback_is_fetched_with_allow_private(host):
    [image] = load([host.url + "/pic.png"], allow_private=True)
    assert image.size == (30, 40) and image.mode == "RGB"


# -- the connection goes to the checked address ----------------------------------------------------------


def test_connects_to_the_checked_address_with_the_name_as_host(public_host, monkeypatch):
    """DNS rebinding: the name is resolved once per hop; a second answer (here loopback) is never used."""
    answers = [["127.0.0.2"], ["127.0.0.1"]]
    calls = []

    async def lookup(name, port):
        calls.append(name)
        return answers[min(len(calls) - 1, 1)]

    monkeypatch.setattr(images, "lookup", lookup)
    [image] = load([f"http://rebind.test:{public_host.port}/pic.png"])
    assert image.size == (30, 40)
    assert calls == ["rebind.test"]
    assert public_host.hits == [("/pic.png", f"rebind.test:{public_host.port}")]


def test_https_names_the_host_for_sni_and_certificate_checks():
    with httpx.Client() as client:
        request = images.pinned_request(client, parse_url("https://example.com/a.png?x=1"), "93.184.216.34")
    assert str(request.url) == "https://93.184.216.34/a.png?x=1"
    assert request.headers["host"] == "example.com"
    assert request.extensions["sni_hostname"] == "example.com"


# -- redirects -------------------------------------------------------------------------------------------


def test_redirect_from_public_to_private_is_refused(public_host, host):
    target = f"{host.url}/pic.png"
    err = refused([f"http://public.test:{public_host.port}/redirect?to={target}"])
    assert err.message == GENERIC
    assert [p for p, _ in public_host.hits] == [f"/redirect?to={target}"] and host.hits == []


def test_redirect_to_a_metadata_address_is_refused(public_host):
    err = refused([f"http://public.test:{public_host.port}/redirect?to=http://169.254.169.254/latest/meta-data/"])
    assert err.message == GENERIC


def test_redirect_to_another_scheme_is_refused_with_the_same_message(public_host):
    err = refused([f"http://public.test:{public_host.port}/redirect?to=file:///etc/passwd"])
    assert err.message == GENERIC


def test_redirects_are_followed_when_allowed(host):
    [image] = load([f"{host.url}/redirect?to=/redirect%3Fto%3D/pic.png"], allow_private=True)
    assert image.size == (30, 40) and len(host.hits) == 3


def test_redirects_are_bounded(host):
    loop = f"{host.url}/redirect?to={host.url}/redirect%3Fto%3D/pic.png"
    assert refused([loop], allow_private=True, max_redirects=1).message == GENERIC
    assert len(host.hits) == 2


# -- malformed URLs are the client's 400, naming the field -----------------------------------------------

MALFORMED = ["http://[::1", "http://[::1]:99999/", "http://example.com:99999/x", "http://example.com:0/",
             "http://" + "a" * 9000 + ".com/", "http://" + "a" * 70000, "ftp://example.com/a.png",
             "file:///etc/passwd", "gopher://example.com/", "javascript:alert(1)", "http:///nohost",
             "http://\udcff.com/", "HTTP//example.com", "//example.com/a.png", "", "http://exa\x00mple.com/"]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_urls_are_400_naming_the_field(url):
    err = refused([url])
    assert err.status == 400 and err.param == "messages"


# -- the same message whatever answered ------------------------------------------------------------------


def test_failures_read_alike_whatever_answered(host):
    """No status code, no refused-or-timed-out: the errors cannot be used to scan ports."""
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    port = closed_port.getsockname()[1]
    closed_port.close()
    urls = [f"{host.url}/missing", f"http://127.0.0.1:{port}/", f"{host.url}/hang", "http://no-such-host.invalid/"]
    for url in urls:
        err = refused([url], allow_private=True, fetch_timeout=0.5)
        assert (err.status, err.message, err.code) == (400, GENERIC, "image_fetch_failed"), url
    assert refused([f"{host.url}/pic.png"]).message == GENERIC  # refused by the address check: the same


# -- deadline, cancellation, concurrency -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/hang", "/drip", "/slow-redirect?to=/slow-redirect%3Fto%3D/slow-redirect"])
def test_one_deadline_covers_the_whole_fetch(host, path):
    """Per-read timeouts never fire on a server that drips a byte at a time or redirects slowly."""
    start = time.monotonic()
    assert refused([host.url + path], allow_private=True, fetch_timeout=1.0, max_redirects=50).message == GENERIC
    assert time.monotonic() - start < 2.0


def test_fetch_is_cancelled_when_the_client_goes_away(host):
    async def go():
        start = time.monotonic()

        async def gone():
            return time.monotonic() - start > 0.3

        with pytest.raises(APIError) as info:
            await ImageLoader(ImageLimits(allow_private=True, fetch_timeout=30)).load([host.url + "/hang"], gone)
        return info.value, time.monotonic() - start

    err, elapsed = asyncio.run(go())
    assert err.status == 499 and elapsed < 1.5
    assert host.closed.wait(3), "the fetch's connection was not closed"


def test_concurrent_fetches_are_bounded_server_wide(host):
    """Over --max-concurrent-image-fetches a request is refused at once (503, Retry-After), not queued."""
    async def go():
        loader = ImageLoader(ImageLimits(allow_private=True, max_fetches=2, max_images=2, fetch_timeout=30))
        first = asyncio.ensure_future(loader.load([host.url + "/hang", host.url + "/hang"], connected))
        while len(host.hits) < 2:
            await asyncio.sleep(0.02)
        with pytest.raises(APIError) as info:
            await loader.load([host.url + "/pic.png"], connected)
        data_only = await loader.load([data_url(png_bytes())], connected)  # data URLs need no slot
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        after = await loader.load([host.url + "/pic.png"], connected)
        return info.value, data_only, after, loader.slots.used

    err, data_only, after, used = asyncio.run(go())
    assert (err.status, err.code, err.headers) == (503, "queue_full", {"Retry-After": "1"})
    assert len(data_only) == 1 and len(after) == 1 and used == 0


def test_a_failed_fetch_cancels_the_others(host):
    async def go():
        loader = ImageLoader(ImageLimits(allow_private=True, fetch_timeout=30))
        with pytest.raises(APIError):
            await loader.load([host.url + "/hang", host.url + "/missing"], connected)
        return loader.slots.used

    assert asyncio.run(go()) == 0
    assert host.closed.wait(3)


# -- limits ----------------------------------------------------------------------------------------------


def test_images_per_request_are_limited():
    err = refused([data_url(png_bytes())] * 3, max_images=2)
    assert (err.status, err.code) == (400, "too_many_images") and "at most 2 images" in err.message


def test_image_bytes_are_limited(host):
    err = refused([host.url + "/big"], allow_private=True, max_bytes=1000)
    assert (err.status, err.code) == (400, "image_too_large")
    err = refused([data_url(b"\0" * 5000)], max_bytes=1000)
    assert err.status == 400 and "limit of 1000 bytes" in err.message


def test_compressed_bodies_are_refused_before_expanding(host):
    """A gzip body could expand a thousandfold in one chunk before the byte limit is checked."""
    assert refused([host.url + "/gzip"], allow_private=True, max_bytes=1 << 20).message == GENERIC
    assert host.hits[0][0] == "/gzip"


def test_total_pixels_are_checked_from_headers_before_decoding(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("decoded an image over the pixel budget")

    monkeypatch.setattr(images, "load_image", never)
    err = refused([data_url(png_header(5000, 5000)), data_url(png_header(5000, 5000))], max_pixels=40_000_000)
    assert (err.status, err.code) == (400, "too_many_pixels") and "50000000 pixels together" in err.message


@pytest.mark.parametrize("size", [(9000, 9000), (100_000, 100_000), (2**31 - 1, 2**31 - 1)])
def test_decompression_bombs_are_400(size):
    err = refused([data_url(png_header(*size))])
    assert (err.status, err.code) == (400, "too_many_pixels")


# -- any bytes: an image or a 400 ------------------------------------------------------------------------


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 12), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


SAMPLES = {
    "png-1": png_bytes(mode="1"), "png-L": png_bytes(mode="L"), "png-LA": png_bytes(mode="LA"),
    "png-P": png_bytes(mode="P", transparency=0), "png-RGBA": png_bytes(mode="RGBA"),
    "png-I;16": png_bytes(mode="I;16"), "jpeg-CMYK": png_bytes(mode="CMYK", fmt="JPEG"),
    "jpeg-L": png_bytes(mode="L", fmt="JPEG"), "tiff-CMYK": png_bytes(mode="CMYK", fmt="TIFF"),
    "tiff-F": png_bytes(mode="F", fmt="TIFF"), "tiff-I": png_bytes(mode="I", fmt="TIFF"),
    "tiff-I;16B": png_bytes(mode="I;16B", fmt="TIFF"), "tiff-LAB": png_bytes(mode="LAB", fmt="TIFF"),
    "tiff-YCbCr": png_bytes(mode="YCbCr", fmt="TIFF"), "webp-RGBA": png_bytes(mode="RGBA", fmt="WEBP"),
    "bmp-P": png_bytes(mode="P", fmt="BMP"), "ico": png_bytes(mode="RGBA", fmt="ICO"),
    "gif-animated": animated("GIF"), "webp-animated": animated("WEBP"), "apng": animated("PNG"),
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_mode_and_animated_images_decode_to_rgb(name):
    [image] = decode_images([SAMPLES[name]], 50_000_000)
    assert image.mode == "RGB" and image.size[0] > 0
    preprocess([image], ImageProcessorConfig(image_size=32))


@pytest.mark.parametrize("name", sorted(SAMPLES))
@pytest.mark.parametrize("keep", [0.0, 0.3, 0.6, 0.95])
def test_truncated_images_are_an_image_or_400(name, keep):
    check_image_or_400(SAMPLES[name][:int(len(SAMPLES[name]) * keep)])


def check_image_or_400(data: bytes) -> None:
    """What the server does with an image's bytes: decode, then preprocess; only a 400 may stop it."""
    try:
        result = decode_images([data], 1_000_000)
    except APIError as e:
        assert e.status == 400 and e.param == "messages"
        return
    assert [im.mode for im in result] == ["RGB"]
    preprocess(result, ImageProcessorConfig(image_size=32))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(SAMPLES)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                  max_size=8), st.integers(0, 10_000))
def test_mutated_images_are_an_image_or_400(name, flips, cut):
    """Property: any corruption of a real file (bytes changed, then cut) gives an RGB image or a 400."""
    data = bytearray(SAMPLES[name])
    for position, value in flips:
        data[position % len(data)] = value
    check_image_or_400(bytes(data[:max(cut, 1)]))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_are_an_image_or_400(data):
    check_image_or_400(data)


# -- the real server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The default server (private URLs refused), and one that allows them with tight limits."""
    os.environ["GEMMA_TPA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    default = LiveServer(["--cache-memory", "0.02"])
    private = LiveServer(["--cache-memory", "0.02", "--allow-private-image-urls", "--max-images-per-request", "2",
                          "--image-fetch-timeout", "1"])
    yield default, private
    default.stop()
    private.stop()


def ask(server: LiveServer, *urls: str, timeout: float = 30) -> httpx.Response:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": "What?"}]
    return httpx.post(server.url + "/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]})


def test_server_refuses_loopback_by_default(servers, host):
    default, _ = servers
    for url in [f"{host.url}/pic.png", f"http://2130706433:{host.port}/pic.png",
                f"http://[::ffff:127.0.0.1]:{host.port}/pic.png", f"http://localhost:{host.port}/missing"]:
        r = ask(default, url)
        assert r.status_code == 400 and r.json()["error"] == {
            "message": GENERIC, "type": "invalid_request_error", "param": "messages", "code": "image_fetch_failed"}
    assert host.hits == []


def test_server_fetches_loopback_with_the_flag(servers, host):
    _, private = servers
    r = ask(private, f"{host.url}/pic.png")
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 4
    r = ask(private, f"{host.url}/missing")
    assert r.status_code == 400 and r.json()["error"]["message"] == GENERIC  # no "HTTP 404"


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999/", "http://" + "a" * 70000, "ftp://a/b"])
def test_server_answers_malformed_urls_with_400(servers, url):
    for server in servers:
        r = ask(server, url)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_server_limits_images_per_request(servers):
    _, private = servers
    r = ask(private, *[data_url(png_bytes())] * 3)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"


def test_server_deadline_and_bombs(servers, host):
    _, private = servers
    start = time.monotonic()
    r = ask(private, f"{host.url}/drip")
    assert r.status_code == 400 and time.monotonic() - start < 3
    r = ask(private, data_url(png_header(100_000, 100_000)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_pixels"
    r = ask(private, data_url(SAMPLES["jpeg-CMYK"][:200]))
    assert r.status_code == 400


def test_server_cancels_the_fetch_when_the_client_leaves(host):
    private_slow = LiveServer(["--cache-memory", "0.02", "--allow-private-image-urls", "--image-fetch-timeout", "30"])
    try:
        with pytest.raises(httpx.ReadTimeout):
            ask(private_slow, f"{host.url}/hang", timeout=0.5)
        assert host.closed.wait(3), "the server kept fetching after its client left"
    finally:
        private_slow.stop()


def test_health_answers_while_an_image_decodes(servers, monkeypatch):
    """Decoding and preprocessing run in a worker thread: a slow decode does not block /health."""
    _, private = servers
    real = images.load_image

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "load_image", slow)
    done = threading.Event()
    thread = threading.Thread(target=lambda: (ask(private, data_url(png_bytes())), done.set()))
    thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert httpx.get(private.url + "/health", timeout=5).status_code == 200
    assert time.monotonic() - start < 0.5 and not done.is_set()
    thread.join(10)


def test_remote_images_can_be_turned_off(host):
    server = LiveServer(["--cache-memory", "0.02", "--disable-remote-images", "--allow-private-image-urls"])
    try:
        r = ask(server, f"{host.url}/pic.png")
        assert r.status_code == 400 and "remote images is turned off" in r.json()["error"]["message"]
        assert host.hits == []
    finally:
        server.stop()


# -- flags -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--max-images-per-request", "--max-image-pixels", "--max-image-bytes",
                                  "--image-fetch-timeout", "--max-concurrent-image-fetches"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "many"])
def test_image_flags_must_be_positive_numbers(flag, value, capsys):
    from server.cli import serve_parser

    with pytest.raises(SystemExit) as info:
        serve_parser().parse_args([flag, value])
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_fetch_limit_must_hold_a_full_request(tmp_path, capsys):
    """Else a request with the most images allowed could never be served: refused like every other bad flag,
    before the model loads (a missing model would be status 1), with one line and status 2."""
    from server.cli import serve_main

    with pytest.raises(SystemExit) as info:
        serve_main(["--model", str(tmp_path / "missing"), "--max-images-per-request", "40"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("tpa-serve: error: --max-concurrent-image-fetches (32) must be at least "
                       "--max-images-per-request (40)")
