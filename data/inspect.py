"""Look at a shard source before training on it: `python -m data.inspect SOURCE [--split S] [--count]`.

    python -m data.inspect /data/imagenet-wds                    # a folder with _info.json
    python -m data.inspect https://host/imagenet-wds/            # the same over HTTP(S); s3://, gs://, hf:// too
    python -m data.inspect 'pipe:curl -fsSL https://host/imagenet1k-train-{0000..1023}.tar' --count \\
        --write-info .                                           # counts every shard, writes ./_info.json

Prints the splits (shards, samples), the first sample's fields and its decoded image size and label, as
JSON. An unreachable or malformed source ends with exit status 2 and one line saying what is wrong (with
credentials redacted).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
from collections.abc import Sequence

from data.info import INFO_NAME, SHARD_IN_COMMAND, SPLIT_NAMES, Shard, load_info, pick_split, resolve_split, write_info
from data.sources import NetOptions, open_shard, redact, source_kind


def first_sample(shard: Shard, net: NetOptions) -> dict:
    """The fields of a shard's first sample (names and byte sizes), its image size and label."""
    from PIL import Image

    fields: dict[str, bytes] = {}
    key = None
    with open_shard(shard.path, net) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            name, _, ext = member.name.rpartition("/")[2].partition(".")
            if key is not None and name != key:
                break
            key = name
            fields[ext] = tar.extractfile(member).read()
    if key is None:
        raise ValueError(f"{redact(shard.path)}: no samples in the first shard")
    out: dict = {"key": key, "fields": {ext: len(data) for ext, data in fields.items()}}
    image = next((fields[e] for e in ("jpg", "jpeg", "png", "webp") if e in fields), None)
    if image is not None:
        with Image.open(io.BytesIO(image)) as img:
            out["image_size"] = list(img.size)
            out["image_mode"] = img.mode
    if "cls" in fields:
        out["label"] = fields["cls"].decode(errors="replace").strip()
    return out


def describe(source: str, split: str, net: NetOptions, count: bool) -> tuple[dict, tuple[Shard, ...]]:
    """(what the source holds, as a dict ready for JSON; its shards)."""
    report: dict = {"source": redact(source)}
    folder = (source_kind(source) == "local" and os.path.isdir(source)) or source.endswith("/")
    if folder and source_kind(source) != "pipe":
        info = load_info(source, net)
        report["splits"] = {name: {"shards": len(entry["filenames"]), "samples": int(sum(entry["shard_lengths"]))}
                            for name, entry in info["splits"].items()}
        report["classes"] = len(info.get("classes", ()))
        pick_split(info, split, redact(source))  # the split asked for exists (under either name)
    shards = resolve_split(source, split, net, count_samples=count)
    report["split"] = split
    report["shards"] = len(shards.shards)
    report["samples"] = shards.num_samples
    report["first_sample"] = first_sample(shards.shards[0], net)
    return report, shards.shards


def shard_name(source: str) -> str:
    """The file name of a shard source (a path, a URL, or the .tar inside a `pipe:` command)."""
    found = SHARD_IN_COMMAND.search(source)
    return found.group(2) if found else source.rstrip("/").rsplit("/", 1)[-1]


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n")[0])
    p.add_argument("source", help="shard folder (path or URL ending in /) or brace pattern (paths, URLs, pipe:)")
    p.add_argument("--split", default="train", help=f"split to look at (default train; {SPLIT_NAMES['val']} alike)")
    p.add_argument("--count", action="store_true", help="count samples of shards no _info.json lists "
                   "(downloads each remote shard once)")
    p.add_argument("--write-info", metavar="DIR", help="write DIR/_info.json (timm's layout) for the shards found")
    p.add_argument("--retries", type=int, default=2, help="retries per shard (default 2)")
    args = p.parse_args(argv)
    net = NetOptions(retries=args.retries, backoff=0.5)
    try:
        report, shards = describe(args.source, args.split, net, args.count or bool(args.write_info))
        if args.write_info:
            write_info(args.write_info, {"splits": {args.split: {
                "name": args.split, "filenames": [shard_name(s.path) for s in shards],
                "shard_lengths": [s.num_samples for s in shards], "num_samples": sum(s.num_samples for s in shards)}}})
            report["wrote"] = os.path.join(args.write_info, INFO_NAME)
    except (OSError, ValueError, KeyError, ImportError, tarfile.TarError) as e:
        print(f"data.inspect: {redact(args.source)}: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
