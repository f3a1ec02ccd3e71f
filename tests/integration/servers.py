"""Real servers on loopback for the source tests: moto's S3 and a plain HTTP file server.

Both count the requests they receive, on the server side, so tests can assert
how many GETs a load caused.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

CREDENTIALS = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}


class CountingMotoServer(ThreadedMotoServer):
    """moto's S3 server on 127.0.0.1 (a free port) that counts ``(method, path)`` requests."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.requests: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting(
            environ: dict[str, Any], start_response: Callable[..., Any]
        ) -> Iterable[bytes]:
            with self._lock:
                self.requests[(environ["REQUEST_METHOD"], environ["PATH_INFO"])] += 1
            return app(environ, start_response)

        self._server = make_server(
            self._ip_address, self._port, counting, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def endpoint(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def gets(self, path_part: str = "") -> int:
        """GET requests whose path contains ``path_part``."""
        with self._lock:
            return sum(n for (m, p), n in self.requests.items() if m == "GET" and path_part in p)


class FileServer:
    """``python -m http.server`` in a thread, on 127.0.0.1, over ``root``.

    ``fail_next[path] = n`` answers the next n GETs of ``path`` with 503.
    """

    def __init__(self, root: Path) -> None:
        self.gets: Counter[str] = Counter()
        self.fail_next: Counter[str] = Counter()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.gets[self.path] += 1
                if server.fail_next[self.path] > 0:
                    server.fail_next[self.path] -= 1
                    self.send_error(503, "injected")
                    return
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


async def upload(server: CountingMotoServer, bucket: str, prefix: str, directory: Path) -> None:
    from aiobotocore.session import get_session

    from lorapool.formats import ADAPTER_FILES

    async with get_session().create_client(
        "s3", endpoint_url=server.endpoint, **CREDENTIALS
    ) as client:
        buckets = await client.list_buckets()
        if bucket not in {b["Name"] for b in buckets.get("Buckets", [])}:
            await client.create_bucket(Bucket=bucket)
        for name in ADAPTER_FILES:
            body = (directory / name).read_bytes()
            await client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=body)
