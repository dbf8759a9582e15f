"""A private package index for tests: PEP 503 simple pages over a wheelhouse, behind HTTP
basic auth, on loopback, in a thread. It records every request's path and whether it
carried the right credentials."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class PrivateIndex:
    """Where the index listens and what it saw."""

    url: str  # without credentials, ending in /simple
    user: str
    password: str
    requests: list[tuple[str, bool]] = field(default_factory=list)  # (path, authorized)

    @property
    def url_with_credentials(self) -> str:
        return self.url.replace("://", f"://{self.user}:{self.password}@", 1)

    def served(self, what: str) -> bool:
        """Whether an authorized request fetched a path containing ``what``."""
        return any(what in path and ok for path, ok in self.requests)


@contextmanager
def private_index(
    wheelhouse: Path, user: str = "ci", password: str = "s3cret-pw"
) -> Iterator[PrivateIndex]:
    wheels = {p.name: p for p in wheelhouse.glob("*.whl")}
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    index = PrivateIndex("", user, password)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self.do_GET(body=False)

        def do_GET(self, body: bool = True) -> None:
            ok = self.headers.get("Authorization") == expected
            index.requests.append((self.path, ok))
            if not ok:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="private"')
                self.end_headers()
                return
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if parts[:1] == ["simple"] and len(parts) == 2:
                name = _normalize(parts[1])
                links = [
                    f'<a href="/files/{n}#sha256={hashlib.sha256(p.read_bytes()).hexdigest()}">'
                    f"{html.escape(n)}</a>"
                    for n, p in sorted(wheels.items())
                    if _normalize(n.split("-")[0]) == name
                ]
                if not links:
                    self.send_error(404)
                    return
                self._send(
                    ("<html><body>" + "\n".join(links) + "</body></html>").encode(), "text/html"
                )
            elif parts[:1] == ["files"] and len(parts) == 2 and parts[1] in wheels:
                self._send(wheels[parts[1]].read_bytes(), "application/octet-stream")
            else:
                self.send_error(404)

        def _send(self, data: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    index.url = f"http://127.0.0.1:{server.server_address[1]}/simple"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield index
    finally:
        server.shutdown()
        server.server_close()
