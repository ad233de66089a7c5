"""`_info.json`: the shard index written by `data.convert` and read by every pipeline.

The layout is the one timm's WebDataset reader understands (`splits.<name>.{num_samples, filenames,
shard_lengths}`), plus the class names, so `timm.data.create_dataset("wds/...", root=OUT)` reads our
shards unchanged.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import warnings
from dataclasses import dataclass

from braceexpand import braceexpand

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


def load_info(directory: str) -> dict:
    """Read `_info.json` from a shard directory, with an error that names the file."""
    path = os.path.join(directory, INFO_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no shard index; build the shards with `python -m data.convert`")
    try:
        with open(path) as f:
            info = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if "splits" not in info:
        raise ValueError(f"{path}: missing key 'splits'")
    return info


def count_tar_samples(path: str) -> int:
    """Count samples (distinct keys) in a tar by reading its headers only."""
    keys = set()
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isreg():
                    base = os.path.basename(member.name)
                    keys.add(os.path.join(os.path.dirname(member.name), base.split(".", 1)[0]))
    except tarfile.TarError as e:
        # A damaged shard still counts what is readable; the stream skips and counts the rest.
        warnings.warn(f"{path}: unreadable tar after {len(keys)} samples ({e})", stacklevel=2)
    return len(keys)


def resolve_split(spec: str, split: str) -> SplitShards:
    """Turn `data.train`/`data.val` into shards with sample counts.

    `spec` is a shard directory holding `_info.json` (the `split` entry is used) or a brace pattern of
    local tar files (`/data/train-{000000..000127}.tar`); counts for a pattern come from an
    `_info.json` beside the files when it lists them, else from the tar headers.
    """
    if os.path.isdir(spec):
        info = load_info(spec)
        if split not in info["splits"]:
            raise ValueError(
                f"{os.path.join(spec, INFO_NAME)}: no split '{split}' (has {sorted(info['splits'])})"
            )
        entry = info["splits"][split]
        shards = tuple(
            Shard(os.path.join(spec, name), int(n))
            for name, n in zip(entry["filenames"], entry["shard_lengths"], strict=True)
        )
        missing = [s.path for s in shards if not os.path.isfile(s.path)]
        if missing:
            raise FileNotFoundError(f"{spec}: {len(missing)} shard(s) listed in {INFO_NAME} are missing, "
                                    f"first: {missing[0]}")
        return SplitShards(shards, tuple(info.get("classes", ())))

    paths = [p for pattern in braceexpand(spec) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise FileNotFoundError(f"shard pattern matches no file: {spec!r}")
    known: dict[str, int] = {}
    classes: tuple[str, ...] = ()
    parent = os.path.dirname(paths[0])
    if os.path.isfile(os.path.join(parent, INFO_NAME)):
        info = load_info(parent)
        classes = tuple(info.get("classes", ()))
        for entry in info["splits"].values():
            for name, n in zip(entry["filenames"], entry["shard_lengths"], strict=True):
                known[os.path.join(parent, name)] = int(n)
    shards = tuple(Shard(p, known[p] if p in known else count_tar_samples(p)) for p in paths)
    return SplitShards(shards, classes)
