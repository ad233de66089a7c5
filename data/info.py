"""`_info.json`: the shard index written by `data.convert` and read by every pipeline.

The layout is the one timm's WebDataset reader understands (`splits.<name>.{num_samples, filenames,
shard_lengths}`), plus the class names, so `timm.data.create_dataset("wds/...", root=OUT)` reads our
shards unchanged.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import tarfile
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from braceexpand import braceexpand

from data.sources import NetOptions, ShardUnreachable, join, open_shard, parent, read_bytes, redact, source_kind

INFO_NAME = "_info.json"


@dataclass(frozen=True)
class Shard:
    """One tar file and the number of samples in it."""

    path: str
    num_samples: int


@dataclass(frozen=True)
class SplitShards:
    """The shards of one split, in index order, and the class names when known."""

    shards: tuple[Shard, ...]
    classes: tuple[str, ...] = ()

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def write_info(out_dir: str, info: dict) -> None:
    """Write `_info.json` atomically (a reader never sees a half-written index)."""
    path = os.path.join(out_dir, INFO_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_info(directory: str, net: NetOptions | None = None) -> dict:
    """Read `_info.json` from a shard folder (a path or a URL), with an error that names the file."""
    path = join(directory, INFO_NAME)
    try:
        if source_kind(directory) == "local":
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no shard index; build the shards with `python -m data.convert`")
            with open(path) as f:
                text = f.read()
        else:  # never from data.cache_dir: an index must be the current one on every node
            text = read_bytes(path, dataclasses.replace(net or NetOptions(), cache_dir="")).decode()
        info = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{redact(path)}: not valid JSON ({e})") from e
    if "splits" not in info:
        raise ValueError(f"{redact(path)}: missing key 'splits'")
    return info


def count_tar_samples(path: str, net: NetOptions | None = None) -> int:
    """Count samples (distinct keys) in a tar by reading its headers (a remote one is streamed once)."""
    keys = set()
    try:
        with open_shard(path, net) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.isreg():
                    base = os.path.basename(member.name)
                    keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    except tarfile.TarError as e:
        # A damaged shard still counts what is readable; the stream skips and counts the rest.
        warnings.warn(f"{redact(path)}: unreadable tar after {len(keys)} samples ({e})", stacklevel=2)
    return len(keys)


SPLIT_NAMES = {"train": ("train",), "val": ("val", "validation"), "validation": ("validation", "val")}
"""Names a split may have in an `_info.json`: ours (`val`) and timm's (`validation`) are the same split."""


def pick_split(info: dict, split: str, where: str) -> dict:
    """The entry of `split` (or its other name, see SPLIT_NAMES) in an `_info.json`."""
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in info["splits"]:
            return info["splits"][name]
    raise ValueError(f"{where}: no split '{split}' (has {sorted(info['splits'])}); name the split with "
                     f"data.train_split / data.val_split (or --split for trainer.evaluate)")


def resolve_split(spec: str, split: str, net: NetOptions | None = None, count_samples: bool = False) -> SplitShards:
    """Turn `data.train`/`data.val` into shards with sample counts.

    `spec` is a shard folder holding `_info.json` (a local directory, or a URL ending in `/`: http(s), s3://,
    gs://, hf://), whose `split` entry lists the shards; or a brace pattern of shards (local paths and globs,
    URLs, or `pipe:` commands). A pattern's counts come from an `_info.json` beside the shards when it
    lists them, else from the tar headers: local tars are read, remote ones only with count_samples
    (it downloads every shard once); otherwise the split is refused, since guessed counts would break the
    equal number of steps on every rank.
    """
    kind = source_kind(spec)
    if (kind == "local" and os.path.isdir(spec)) or (kind in ("http", "fsspec") and spec.endswith("/")):
        return _from_info(spec, split, net)
    return _from_pattern(spec, net, count_samples)


def _from_info(folder: str, split: str, net: NetOptions | None) -> SplitShards:
    info = load_info(folder, net)
    entry = pick_split(info, split, redact(join(folder, INFO_NAME)))
    shards = tuple(Shard(join(folder, name), int(n))
                   for name, n in zip(entry["filenames"], entry["shard_lengths"], strict=True))
    missing = [s.path for s in shards if source_kind(s.path) == "local" and not os.path.isfile(s.path)]
    if missing:
        present = len(shards) - len(missing)
        raise FileNotFoundError(
            f"{folder}: {len(missing)} of the {len(shards)} shard(s) listed in {INFO_NAME} are missing, first: "
            f"{missing[0]}. Finish the download, or train on the {present} present: give the shards as a "
            f"pattern, e.g. data.train='{os.path.join(folder, os.path.basename(missing[0]).rsplit('-', 1)[0])}-*.tar' "
            f"(their counts still come from {INFO_NAME})")
    return SplitShards(shards, tuple(info.get("classes", ())))


def _from_pattern(spec: str, net: NetOptions | None, count_samples: bool) -> SplitShards:
    if source_kind(spec) == "local":
        paths = [p for pattern in braceexpand(spec) for p in sorted(glob.glob(pattern))]
        if not paths:
            raise FileNotFoundError(f"shard pattern matches no file: {spec!r}")
    else:
        paths = list(braceexpand(spec))
    known: dict[str, int] = {}
    classes: tuple[str, ...] = ()
    info_source, shard_source = _index_beside(paths[0])
    info = _info_beside(info_source, net) if info_source else None
    if info is not None:
        classes = tuple(info.get("classes", ()))
        for entry in info["splits"].values():
            for name, n in zip(entry["filenames"], entry["shard_lengths"], strict=True):
                known[shard_source(name)] = int(n)
    unknown = [p for p in paths if p not in known]
    remote = [p for p in unknown if source_kind(p) != "local"]
    if remote and not count_samples:
        raise ValueError(
            f"{redact(spec)}: sample counts of {len(remote)} remote shard(s) are unknown (no {INFO_NAME} beside "
            f"them lists them). Every rank must know them to run the same number of steps: put an {INFO_NAME} "
            f"next to the shards (python -m data.inspect SOURCE --write-info), or let every rank count them "
            f"by downloading each shard once: data.count_samples=true")
    return SplitShards(tuple(Shard(p, known[p] if p in known else count_tar_samples(p, net)) for p in paths), classes)


SHARD_IN_COMMAND = re.compile(r"(\S*/)([^/\s'\"]+\.tar)")


def _index_beside(first: str) -> tuple[str, Callable[[str], str]]:
    """(where the `_info.json` beside a pattern's first shard is, how a listed shard name becomes a source).

    For a `pipe:` command the index is fetched by the same command with the shard's file name swapped for
    `_info.json`, so a curl header or an aws profile in it applies to the index too; ("", ...) when the
    command names no .tar."""
    if source_kind(first) != "pipe":
        folder = parent(first)
        return join(folder, INFO_NAME), lambda name: join(folder, name)
    found = SHARD_IN_COMMAND.search(first)
    if found is None:
        return "", lambda name: name
    start, end = found.span(2)
    return first[:start] + INFO_NAME + first[end:], lambda name: first[:start] + name + first[end:]


def _info_beside(source: str, net: NetOptions | None) -> dict | None:
    """The `_info.json` at `source`, or None when there is none.

    Only "not there" means none (HTTP 404, a missing object, a `pipe:` command that fails at once); any other
    failure is retried like a shard and then raised, so a passing server hiccup never leaves one rank
    without the counts the others have."""
    if source_kind(source) == "local":
        return load_info(parent(source)) if os.path.isfile(source) else None
    net = dataclasses.replace(net or NetOptions(), cache_dir="")
    try:
        text = read_bytes(source, dataclasses.replace(net, retries=0)).decode()
    except ShardUnreachable as e:
        absent = (isinstance(e.last_error, urllib.error.HTTPError) and e.last_error.code == 404) or isinstance(
            e.last_error, FileNotFoundError) or source_kind(source) == "pipe"
        if absent:
            return None
        text = read_bytes(source, net).decode()
    info = json.loads(text)
    return info if isinstance(info, dict) and "splits" in info else None
