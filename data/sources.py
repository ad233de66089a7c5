"""Where shard bytes come from: local files, HTTP(S), `pipe:` commands and fsspec URLs (s3://, gs://, hf://).

Every remote shard is read through `RetryingReader`: a dropped connection, an HTTP error (404, 5xx) or a
server that stalls longer than `read_timeout` is retried with exponential backoff, continuing at the
byte where the stream broke (an HTTP Range request; a `pipe:` command is rerun and the bytes already
read are skipped; an fsspec file seeks). After `retries` failures in a row the shard is given up with
`ShardUnreachable`, which the stream counts as the skip kind `unreachable_shard`. `ReadAhead` reads a
shard in a background thread, so the network works while the worker decodes.

webdataset's own `gopen` opens URLs with curl and fixed retry settings and cannot resume a broken read;
that is why this module exists. Credentials stay with the tools (curl headers, the AWS environment, the
HF token) and `redact` removes them from every source that is printed or logged.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import queue
import re
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from data.cache import open_cached

FSSPEC_SCHEMES = ("s3", "gs", "gcs", "hf", "az", "abfs")
FSSPEC_EXTRA = "pip install 'prunevit[remote]'  (fsspec, s3fs; gcsfs or huggingface_hub for gs:// and hf://)"


@dataclass
class NetOptions:
    """How long to wait for remote shards; the run config's `data` section extends it (`data.retries`, ...)."""

    connect_timeout: float = 30.0
    """Seconds to open a connection (HTTP: the socket timeout is the larger of the two), or to a `pipe:` command's
    first byte."""
    read_timeout: float = 60.0
    """Seconds without a byte before a read counts as stalled and is retried."""
    retries: int = 5
    """Failures in a row before a shard is given up (skipped and counted as unreachable_shard)."""
    backoff: float = 1.0
    """Wait before the first retry; doubled for every further one, capped at backoff_max."""
    backoff_max: float = 30.0
    """Longest wait between two retries."""
    read_ahead_mb: float = 32.0
    """Bytes of each shard read ahead in the background (per open shard)."""
    cache_dir: str = ""
    """Keep a copy of every remote shard read to the end here; later reads take it from disk ('' = no cache)."""
    cache_max_gb: float = 100.0
    """Size bound of cache_dir: the least recently used shards are deleted beyond it."""


class ShardUnreachable(OSError):
    """A remote shard that failed `retries` times in a row; the message names it, redacted. `last_error` is the
    failure that ended it (a 404 says "absent", a timeout "unreachable")."""

    last_error: Exception | None = None


def source_kind(url: str) -> str:
    """`local` (a path or file://), `http`, `pipe` or `fsspec`."""
    if url.startswith("pipe:"):
        return "pipe"
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        return "http"
    if scheme in FSSPEC_SCHEMES:
        return "fsspec"
    return "local"


_USERINFO = re.compile(r"(\w+://)[^/@\s]+@")
_QUERY = re.compile(r"(\w+://[^\s'\"?]*)\?[^\s'\"]*")
# -H / --header (also bundled short flags such as -sH) carry tokens in their values.
_HEADER = re.compile(r"""((?<!\S)-[a-zA-Z]*H\s*|--header[=\s]\s*)(['"]?)([\w-]+):[^'"\n]*\2""")
# -u user:pass, --user, --*password*, --*token*, --oauth2-bearer, --aws-sigv4, ...
_SECRET_ARG = re.compile(r"""((?<!\S)(?:-u|--user|--[\w-]*(?:password|passwd|token|secret|bearer|sigv4)[\w-]*)"""
                         r"""[=\s]\s*)(['"]?)[^\s'"]+\2""")
# VAR=value prefixes whose name says secret: AWS_SECRET_ACCESS_KEY=..., HF_TOKEN=...
_SECRET_ENV = re.compile(r"""((?<![^\s:])\w*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY)\w*=)(['"]?)[^\s'"]+\2""",
                         re.IGNORECASE)


def redact(source: str) -> str:
    """A source as it may be printed: no user:password@ in URLs, no query strings (presigned URLs carry their
    signature there), no header values, secret options or secret VAR=value prefixes in `pipe:` commands."""
    out = _USERINFO.sub(r"\1***@", source)
    out = _QUERY.sub(r"\1?***", out)
    out = _HEADER.sub(r"\1\2\3: ***\2", out)
    out = _SECRET_ARG.sub(r"\1\2***\2", out)
    return _SECRET_ENV.sub(r"\1\2***\2", out)


def fsspec_module():
    """fsspec, or an ImportError that says how to install it."""
    try:
        import fsspec
    except ImportError as e:
        raise ImportError(f"reading s3://, gs://, hf:// ... needs fsspec and the protocol's package: {FSSPEC_EXTRA}"
                          ) from e
    return fsspec


def _open_http(url: str, offset: int, opts: NetOptions) -> BinaryIO:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:  # urllib cannot take user:password@ in the URL: send it as Basic auth
        user = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(parts.password or "")
        headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    request = urllib.request.Request(url, headers=headers)
    # The timeout covers the connection and every later socket read: a stalled server raises TimeoutError.
    response = urllib.request.urlopen(request, timeout=max(opts.connect_timeout, opts.read_timeout))  # noqa: S310
    if offset and response.status != 206:  # the server ignored the Range: skip to the offset ourselves
        _discard(response, offset)
    return response


class _PipeStream(io.RawIOBase):
    """stdout of a shell command, with a read timeout (select) and its exit status checked at EOF."""

    def __init__(self, command: str, first_byte_timeout: float, read_timeout: float):
        self.first_byte_timeout, self.read_timeout, self.started = first_byte_timeout, read_timeout, False
        # stderr to a file: a chatty command (curl -v, wget) would block on a full pipe nobody reads.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        # Its own process group, so close() ends a whole pipeline, not just the shell.
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.stderr,  # noqa: S602
                                     start_new_session=True)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        timeout = self.read_timeout if self.started else self.first_byte_timeout
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no byte for {timeout:.0f} s")
        n = os.readv(self.proc.stdout.fileno(), [buffer])
        self.started = True
        if n == 0 and self.proc.wait() != 0:
            self.stderr.seek(0)
            tail = self.stderr.read()[-300:].decode(errors="replace").strip()
            raise OSError(f"command exited with status {self.proc.returncode}" + (f": {tail}" if tail else ""))
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.proc.stdout.close()
        self.stderr.close()
        super().close()


def _open_pipe(url: str, offset: int, opts: NetOptions) -> BinaryIO:
    stream = io.BufferedReader(_PipeStream(url[len("pipe:"):], opts.connect_timeout, opts.read_timeout))
    _discard(stream, offset)
    return stream


def _open_fsspec(url: str, offset: int, opts: NetOptions) -> BinaryIO:
    del opts  # fsspec backends have their own timeouts
    stream = fsspec_module().open(url, "rb").open()
    stream.seek(offset)
    return stream


def _open_local(url: str, offset: int, opts: NetOptions) -> BinaryIO:
    del opts
    stream = open(url[len("file://"):] if url.startswith("file://") else url, "rb")  # noqa: SIM115
    stream.seek(offset)
    return stream


OPENERS: dict[str, Callable[[str, int, NetOptions], BinaryIO]] = {
    "http": _open_http, "pipe": _open_pipe, "fsspec": _open_fsspec, "local": _open_local}


def _discard(stream: BinaryIO, count: int) -> None:
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise OSError(f"stream ended {count} bytes before the resume offset")
        count -= len(chunk)


class RetryingReader(io.RawIOBase):
    """A shard's bytes, reopened at the current offset after any failure, up to `retries` in a row."""

    def __init__(self, url: str, opts: NetOptions, sleep: Callable[[float], None] = time.sleep):
        self.url, self.opts, self.sleep = url, opts, sleep
        self.opener = OPENERS[source_kind(url)]
        self.offset = 0
        self.failures = 0  # in a row; progress resets it
        self.retried = 0  # in total, for the record
        self.stream: BinaryIO | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                if self.stream is None:
                    self.stream = self.opener(self.url, self.offset, self.opts)
                n = self.stream.readinto(buffer)
                # http.client's readinto ends quietly when a connection closes early; its `length` still
                # counts the bytes the server announced and never sent.
                if n == 0 and getattr(self.stream, "length", None):
                    raise http.client.IncompleteRead(b"", self.stream.length)
                self.offset += n
                if n:
                    self.failures = 0
                return n
            except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, HTTP errors, IncompleteRead
                self._failed(e)

    def _failed(self, error: Exception) -> None:
        self._close_stream()
        self.failures += 1
        if self.failures > self.opts.retries:
            unreachable = ShardUnreachable(f"{redact(self.url)}: gave up after {self.opts.retries} retries at byte "
                                           f"{self.offset}: {type(error).__name__}: {redact(str(error))}")
            unreachable.last_error = error
            raise unreachable from None
        self.retried += 1
        self.sleep(min(self.opts.backoff * 2 ** (self.failures - 1), self.opts.backoff_max))

    def _close_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # noqa: BLE001 - a broken stream may fail to close; it is dropped either way
                pass
            self.stream = None

    def close(self) -> None:
        self._close_stream()
        super().close()


class ReadAhead(io.RawIOBase):
    """Reads a stream in a background thread into a bounded queue of chunks, so the network works while the
    consumer decodes. An error in the thread is raised to the reader at the point it happened."""

    CHUNK = 1 << 20

    def __init__(self, stream: BinaryIO, max_bytes: int):
        self.stream = stream
        self.chunks: queue.Queue = queue.Queue(maxsize=max(1, max_bytes // self.CHUNK))
        self.pending = memoryview(b"")
        self.done = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._fill, name="shard-read-ahead", daemon=True)
        self.thread.start()

    def _fill(self) -> None:
        try:
            while not self.stop.is_set():
                chunk = self.stream.read(self.CHUNK)
                self._put(chunk)
                if not chunk:
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._put(e)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.pending:
            if self.done:
                return 0
            item = self.chunks.get()
            if isinstance(item, BaseException):
                self.done = True
                raise item
            if not item:
                self.done = True
                return 0
            self.pending = memoryview(item)
        n = min(len(buffer), len(self.pending))
        buffer[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.stream.close()
        super().close()


def open_shard(url: str, opts: NetOptions | None = None) -> BinaryIO:
    """A buffered binary stream of a shard: local files directly, remote ones retried and read ahead."""
    opts = opts or NetOptions()
    if source_kind(url) == "local":
        return _open_local(url, 0, opts)

    def retrying(u: str) -> BinaryIO:
        return io.BufferedReader(RetryingReader(u, opts), buffer_size=1 << 20)

    stream = open_cached(url, opts.cache_dir, opts.cache_max_gb, retrying) if opts.cache_dir else retrying(url)
    return io.BufferedReader(ReadAhead(stream, int(opts.read_ahead_mb * 2**20)), buffer_size=1 << 16)


def read_bytes(url: str, opts: NetOptions | None = None) -> bytes:
    """A whole small file (an `_info.json`) from any source, retried like shards."""
    with open_shard(url, opts) as stream:
        return stream.read()


def join(base: str, name: str) -> str:
    """`name` inside the folder `base` (a path or a URL; a `pipe:` command has no folder)."""
    if source_kind(base) == "local" and "://" not in base:
        return os.path.join(base, name)
    return base.rstrip("/") + "/" + name


def parent(url: str) -> str:
    """The folder of a path or URL."""
    return url.rsplit("/", 1)[0] if "/" in url else "."


__all__ = ["NetOptions", "ShardUnreachable", "open_shard", "read_bytes", "redact", "source_kind"]
