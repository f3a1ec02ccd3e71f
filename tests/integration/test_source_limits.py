"""Remote sources under caps and redirect rules, against real servers on loopback.

HTTP servers (``http.server`` in threads) that advertise a huge Content-Length,
stream a chunked body past the cap, or redirect elsewhere; moto's S3 server
holding an object over the cap. Real PEFT adapters, registered through a real
TieredStore over MockBackend (what is checked here happens before any engine).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lorapool import AdapterPool, TieredStore
from lorapool.errors import AdapterValidationError, SourceError
from lorapool.formats import ADAPTER_FILES, CONFIG_FILE, WEIGHTS_FILE, ValidationLimits
from lorapool.sources import HttpSource, S3Source
from lorapool.testing import MockBackend

from .servers import CREDENTIALS, CountingMotoServer

MIB = 1 << 20
CAP = ValidationLimits().max_total_bytes
REFUSED_REDIRECT = "redirect to a URL outside the allowed prefixes is not allowed"

Route = Callable[[BaseHTTPRequestHandler], None]


class WebServer:
    """An HTTP/1.1 server on 127.0.0.1: ``files`` by path, ``routes`` for anything else.

    Counts GETs per path; ``finished`` is set when a streaming route's handler ends.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.routes: dict[str, Route] = {}
        self.gets: Counter[str] = Counter()
        self.sent = 0
        self.finished = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server.gets[self.path] += 1
                route = server.routes.get(self.path)
                if route is not None:
                    route(self)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def serve_adapter(self, prefix: str, directory: Path) -> str:
        """Serve the adapter's files under ``prefix``; its URL."""
        for name in ADAPTER_FILES:
            self.files[f"{prefix}/{name}"] = (directory / name).read_bytes()
        return self.url + prefix

    def redirect(self, path: str, location: str) -> None:
        def answer(h: BaseHTTPRequestHandler) -> None:
            h.send_response(302)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()

        self.routes[path] = answer

    def total_gets(self, part: str) -> int:
        return sum(n for path, n in self.gets.items() if part in path)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def web() -> Iterator[tuple[WebServer, WebServer]]:
    """Two servers on different ports: the adapter's and another origin."""
    servers = (WebServer(), WebServer())
    for s in servers:
        s.start()
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def make_pool(tmp_path: Path, source: HttpSource | S3Source, **store: Any) -> AdapterPool:
    scheme = "s3" if isinstance(source, S3Source) else "http"
    return AdapterPool(
        MockBackend(),
        store=TieredStore(
            disk_dir=tmp_path / "disk", sources={scheme: source}, retry_backoff=0.01, **store
        ),
    )


def leftovers(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "disk" / ".tmp").rglob("*"))


def assert_too_large(err: pytest.ExceptionInfo[AdapterValidationError], *names: str) -> None:
    """A ``too_large`` refusal whose message names the cap (each of ``names`` in it)."""
    assert err.value.reason == "too_large", str(err.value)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


# -- caps while reading ------------------------------------------------------------------


async def test_http_content_length_over_the_cap_is_refused_before_the_body(
    tmp_path: Path, web: tuple[WebServer, WebServer], adapters: dict[str, Path]
) -> None:
    server, _ = web
    url = server.serve_adapter("/adapters/huge", adapters["r8-attn"])

    def huge(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(5 * (1 << 29)))  # 2.5 GiB announced
        h.end_headers()
        h.wfile.write(b"\0" * (64 << 10))  # and 64 KiB sent, then the connection closes
        h.close_connection = True

    server.routes[f"/adapters/huge/{WEIGHTS_FILE}"] = huge
    async with make_pool(tmp_path, HttpSource()) as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("web/huge", url, tenant="web")
        assert_too_large(err, str(CAP), "max_total_bytes")
        assert server.gets[f"/adapters/huge/{WEIGHTS_FILE}"] == 1  # refused, not retried
        assert len(pool.registry) == 0
        assert leftovers(tmp_path) == []


async def test_http_chunked_body_is_stopped_past_the_cap(
    tmp_path: Path, web: tuple[WebServer, WebServer], adapters: dict[str, Path]
) -> None:
    server, _ = web
    url = server.serve_adapter("/adapters/endless", adapters["r8-attn"])
    total = 64 * MIB

    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")  # no Content-Length
        h.end_headers()
        chunk = b"\0" * (64 << 10)
        try:
            while server.sent < total:
                h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                server.sent += len(chunk)
            h.wfile.write(b"0\r\n\r\n")
        except OSError:  # the client hung up
            h.close_connection = True
        finally:
            server.finished.set()

    server.routes[f"/adapters/endless/{WEIGHTS_FILE}"] = chunked
    async with make_pool(tmp_path, HttpSource(), disk_bytes="16MiB") as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("web/endless", url, tenant="web")
        assert_too_large(err, "disk_bytes", str(16 * MIB))
        assert len(pool.registry) == 0
        assert leftovers(tmp_path) == []
    # The client hung up at the cap: the server could send no more than what the
    # socket buffers held beyond it, far from the 64 MiB it meant to send.
    assert server.finished.wait(60)
    assert server.sent < total


async def test_s3_object_over_the_cap_is_refused_before_its_body(
    tmp_path: Path, s3_server: CountingMotoServer, adapters: dict[str, Path]
) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3", endpoint_url=s3_server.endpoint, **CREDENTIALS
    ) as client:
        await client.create_bucket(Bucket="adapters")
        config = (adapters["r8-attn"] / CONFIG_FILE).read_bytes()
        await client.put_object(Bucket="adapters", Key=f"big/{CONFIG_FILE}", Body=config)
        await client.put_object(Bucket="adapters", Key=f"big/{WEIGHTS_FILE}", Body=b"\0" * 8 * MIB)
    source = S3Source(endpoint_url=s3_server.endpoint, **CREDENTIALS)
    async with make_pool(tmp_path, source, disk_bytes="4MiB") as pool:
        with pytest.raises(AdapterValidationError) as err:
            await pool.register("s3/big", "s3://adapters/big", tenant="s3")
        assert_too_large(err, "disk_bytes", str(4 * MIB))
        assert s3_server.gets(f"/adapters/big/{WEIGHTS_FILE}") == 1
        assert len(pool.registry) == 0
        assert leftovers(tmp_path) == []


# -- redirects ---------------------------------------------------------------------------


async def test_redirects_stay_within_the_adapters_own_directory(
    tmp_path: Path, web: tuple[WebServer, WebServer], adapters: dict[str, Path]
) -> None:
    server, other = web
    # Within the directory: followed.
    url = server.serve_adapter("/adapters/moved/v2", adapters["r8-attn"])
    for name in ADAPTER_FILES:
        server.redirect(f"/adapters/moved/{name}", f"/adapters/moved/v2/{name}")
    other.serve_adapter("/elsewhere", adapters["r8-attn"])
    server.serve_adapter("/private", adapters["r8-attn"])
    async with make_pool(tmp_path, HttpSource()) as pool:
        info = await pool.register("web/moved", url.removesuffix("/v2"), tenant="web")
        assert info.source == url.removesuffix("/v2")
        assert server.total_gets("/adapters/moved/v2/") == 2

        # Anywhere else: refused, and never requested.
        targets = {  # {d}: the adapter's directory
            "other-origin": f"{other.url}/elsewhere/{CONFIG_FILE}",
            "same-host-outside": f"{server.url}/private/{CONFIG_FILE}",
            "sibling-directory": "{d}-private/" + CONFIG_FILE,
            "dot-dot": "{d}/../../private/" + CONFIG_FILE,
            "encoded-dot-dot": "{d}/%2e%2e/%2e%2e/private/" + CONFIG_FILE,
        }
        for i, (case, location) in enumerate(targets.items()):
            server.redirect(f"/adapters/r{i}/{CONFIG_FILE}", location.format(d=f"/adapters/r{i}"))
            with pytest.raises(SourceError) as err:
                await pool.register(f"web/r{i}", f"{server.url}/adapters/r{i}", tenant="web")
            assert not err.value.transient, case
            assert REFUSED_REDIRECT in str(err.value), case
            assert "private" not in str(err.value) and "elsewhere" not in str(err.value), case
        assert other.total_gets("/") == 0
        assert server.total_gets("private") == 0
        assert [a.adapter_id for a in pool.list_adapters(tenant="web")] == ["web/moved"]
        assert leftovers(tmp_path) == []


async def test_allowed_prefixes_bound_the_url_and_every_redirect(
    tmp_path: Path, web: tuple[WebServer, WebServer], adapters: dict[str, Path]
) -> None:
    origin, mirror = web
    mirrored = mirror.serve_adapter("/mirror/acme", adapters["r8-attn"])
    for name in ADAPTER_FILES:
        origin.redirect(f"/adapters/acme/{name}", f"{mirrored}/{name}")
    mirror.serve_adapter("/private/acme", adapters["r8-attn"])
    mirror.redirect(f"/mirror/sneaky/{CONFIG_FILE}", f"/private/acme/{CONFIG_FILE}")
    source = HttpSource(allowed_prefixes=[f"{origin.url}/adapters/", f"{mirror.url}/mirror/"])
    async with make_pool(tmp_path, source) as pool:
        await pool.register("web/acme", f"{origin.url}/adapters/acme", tenant="web")
        assert mirror.total_gets("/mirror/acme/") == 2

        with pytest.raises(SourceError, match="not allowed") as err:
            await pool.register("web/private", f"{mirror.url}/private/acme", tenant="web")
        assert not err.value.transient
        with pytest.raises(SourceError) as err:
            await pool.register("web/sneaky", f"{mirror.url}/mirror/sneaky", tenant="web")
        assert REFUSED_REDIRECT in str(err.value) and not err.value.transient
        assert mirror.total_gets("/private/") == 0  # a refused URL is never requested
        assert [a.adapter_id for a in pool.list_adapters(tenant="web")] == ["web/acme"]

    with pytest.raises(ValueError, match="http"):
        HttpSource(allowed_prefixes=["ftp://example.com/"])
