"""A loopback HTTP server of shard files, with the faults of a real network: for the tests and for
`python -m trainer.bench data --source http`.

It serves a directory on 127.0.0.1 (Range requests included, as object stores and CDNs answer them) and can
add latency to every request, cap each connection's bandwidth, and make the first N requests of a file
answer 404 or 500, drop the connection half-way, or stall half-way. It runs in a daemon thread and stops
when its `with` block ends (or after `max_seconds`).
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("404", "500", "drop", "stall")


@dataclass
class ServerFaults:
    """What the server does to requests. `first[name] = (fault, n)`: the first n GETs of that file get it."""

    latency_s: float = 0.0
    bytes_per_s: float = 0.0  # per connection; 0 = unlimited
    first: dict[str, tuple[str, int]] = field(default_factory=dict)
    stall_s: float = 30.0
    requests: Counter = field(default_factory=Counter)  # GETs per file, served or failed


class ShardServer:
    """`with ShardServer(directory, faults) as server:` ... `server.url` is `http://127.0.0.1:PORT/`."""

    def __init__(self, directory: str, faults: ServerFaults | None = None, max_seconds: float = 3600):
        self.directory, self.faults = directory, faults or ServerFaults()
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="shard-server", daemon=True)
        self.timer = threading.Timer(max_seconds, self.close)
        self.timer.daemon = True

    def __enter__(self) -> ShardServer:
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    server_state: ShardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet: tests read counters, not logs
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        state = self.server_state
        name = self.path.split("?", 1)[0].lstrip("/")
        faults = state.faults
        with state.lock:  # handler threads share the counters
            faults.requests[name] += 1
            fault, remaining = faults.first.get(name, ("", 0))
            if remaining > 0:
                faults.first[name] = (fault, remaining - 1)
            else:
                fault = ""
        if faults.latency_s:
            time.sleep(faults.latency_s)
        path = os.path.realpath(os.path.join(state.directory, name))
        inside = path.startswith(os.path.realpath(state.directory) + os.sep)
        if fault in ("404", "500") or not inside or not os.path.isfile(path):
            self.send_error(500 if fault == "500" else 404)
            return
        with open(path, "rb") as f:
            data = f.read()
        start = self._range_start(len(data))
        body = data[start:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        cut = len(body) // 2 if fault in ("drop", "stall") else len(body)
        self._send(body[:cut], faults.bytes_per_s)
        if fault == "stall":
            time.sleep(faults.stall_s)
        if fault:
            self.close_connection = True
            self.connection.shutdown(2)

    def _range_start(self, size: int) -> int:
        value = self.headers.get("Range", "")
        if value.startswith("bytes=") and value[6:].split("-", 1)[0].isdigit():
            return min(int(value[6:].split("-", 1)[0]), size)
        return 0

    def _send(self, body: bytes, bytes_per_s: float) -> None:
        chunk = 64 * 1024
        start = time.monotonic()
        for offset in range(0, len(body), chunk):
            self.wfile.write(body[offset:offset + chunk])
            if bytes_per_s:
                due = start + (offset + chunk) / bytes_per_s
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
        self.wfile.flush()
