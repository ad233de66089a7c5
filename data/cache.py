"""A local disk cache of remote shards (`data.cache_dir`): later epochs read them from disk.

A shard is cached while it streams (no wait for a whole download): its bytes go to a temporary file of
this process, which is renamed into place only when the shard was read to the end, so a reader never
sees a partial file and several ranks on one node may fill the cache at once (the last complete copy
wins; the copies are identical). The cache is bounded by `data.cache_max_gb`: after each new shard the
least recently used ones are deleted until it fits (a file still open elsewhere stays readable; POSIX
keeps its data until it is closed).

webdataset's own cache (`cache_dir` of WebDataset) downloads with curl and has no size bound; ours keeps
the retries and read-ahead of data.sources and bounds the disk it uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import time
from typing import BinaryIO

SUFFIX = ".tar"


_SHARD_NAME = re.compile(r"([^/\s'\"?=]+)\.tar\b")
PART_MAX_AGE_S = 6 * 3600  # a `.part` file this old was left by a killed process


def cache_path(cache_dir: str, url: str) -> str:
    """Where a shard's copy lives: a hash of its (full) source, plus its shard name for people (never a query
    string or a command's options: they may carry credentials)."""
    found = _SHARD_NAME.search(url)
    name = found.group(1)[-60:] if found else "shard"
    return os.path.join(cache_dir, hashlib.sha256(url.encode()).hexdigest()[:20] + "-" + name + SUFFIX)


class _Tee(io.RawIOBase):
    """Passes a stream through while copying it to `path`'s temporary file; publishes it on a complete read."""

    def __init__(self, stream: BinaryIO, path: str, max_bytes: int):
        self.stream, self.path, self.max_bytes = stream, path, max_bytes
        self.tmp = f"{path}.part{os.getpid()}"
        self.copy: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()
        self.complete = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.stream.readinto(buffer)
        if n and self.copy is not None:
            try:
                self.copy.write(memoryview(buffer)[:n])
            except OSError:  # the cache is best-effort: a full disk stops the copy, never the read
                self._drop_copy()
        elif not n:
            self.complete = True
        return n

    def _drop_copy(self) -> None:
        if self.copy is not None:
            try:
                self.copy.close()
            except OSError:
                pass
            self.copy = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)

    def close(self) -> None:
        if self.closed:
            return
        self.stream.close()
        if self.copy is not None and self.complete:
            try:
                self.copy.close()
                os.replace(self.tmp, self.path)
                self.copy = None
                evict(os.path.dirname(self.path), self.max_bytes)
            except OSError:
                pass
        self._drop_copy()  # a shard read only in part (or broken) is never published
        super().close()


def open_cached(url: str, cache_dir: str, max_gb: float, open_remote) -> BinaryIO:
    """The shard from the cache when it is there (its use time refreshed), else `open_remote(url)` copied in."""
    path = cache_path(cache_dir, url)
    try:
        stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
    except FileNotFoundError:
        pass
    else:
        with contextlib.suppress(OSError):
            os.utime(path)  # least recently *used* is what eviction drops
        return stream
    remote = open_remote(url)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        return io.BufferedReader(_Tee(remote, path, int(max_gb * 2**30)), buffer_size=1 << 16)
    except OSError:  # an unwritable cache: read without it
        return remote


def evict(cache_dir: str, max_bytes: int) -> list[str]:
    """Delete least recently used shards until the cache holds at most max_bytes; returns the deleted paths."""
    entries = []
    now = time.time()
    for name in os.listdir(cache_dir):
        if ".part" in name:  # a copy left by a killed process is deleted once it is clearly stale
            with contextlib.suppress(OSError):
                if now - os.stat(os.path.join(cache_dir, name)).st_mtime > PART_MAX_AGE_S:
                    os.unlink(os.path.join(cache_dir, name))
        elif name.endswith(SUFFIX):
            try:
                st = os.stat(os.path.join(cache_dir, name))
            except FileNotFoundError:  # another rank evicted it meanwhile
                continue
            entries.append((st.st_mtime, st.st_size, os.path.join(cache_dir, name)))
    total = sum(size for _, size, _ in entries)
    deleted = []
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        try:
            os.unlink(path)
            deleted.append(path)
        except FileNotFoundError:
            pass
        total -= size
    return deleted
