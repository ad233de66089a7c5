"""Streaming benchmark: the train loader's img/s over a slow HTTP server vs the same shards on local disk.

    python -m trainer.bench data --source http [--latency-ms 50] [--mb-per-s 20] [--shard-size 256]
                                               [--img-size 384] [--workers 2] [--batch-size 32] [--rounds 3]

The server (data.http_server, on 127.0.0.1) adds `--latency-ms` to every request and caps every connection
at `--mb-per-s`; the shards hold `--shard-size` synthetic ImageNet-like JPEGs bounded to `--img-size` px.
Both sides run the same TrainLoader (DeiT training transforms, `--workers` processes, `--batch-size`),
alternately (local, http, http, local, ...), from the start of an epoch; the medians of `--rounds`
measurements give `ratio` = http img/s / local img/s (the goal: >= 0.95). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence

import torch

from data.augment_config import AugmentConfig
from data.bench import make_synthetic_folder, measure_ours
from data.convert import convert
from data.http_server import ServerFaults, ShardServer
from data.info import resolve_split
from data.sources import NetOptions
from data.stream import StreamPlan
from data.transforms import train_transform


def run_stream_bench(img_size: int = 384, workers: int = 2, batch_size: int = 32, shard_size: int = 256,
                     latency_ms: float = 50, mb_per_s: float = 20, rounds: int = 3, seed: int = 0) -> dict:
    """Run the benchmark; returns the result dict."""
    shards_per_worker = 2
    with tempfile.TemporaryDirectory(prefix="stream_bench_") as tmp:
        images = make_synthetic_folder(os.path.join(tmp, "images"), shard_size * shards_per_worker * workers)
        shards_dir = os.path.join(tmp, "shards")
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
            convert(images, shards_dir, shard_size=shard_size, max_side=img_size, workers=os.cpu_count() or 1)
        faults = ServerFaults(latency_s=latency_ms / 1000, bytes_per_s=mb_per_s * 1e6)
        transform = train_transform(img_size, AugmentConfig())
        with ShardServer(shards_dir, faults) as server:
            sources = {"local": resolve_split(shards_dir, "train"), "http": resolve_split(server.url, "train")}
            plans = {name: [StreamPlan(split.shards, batch_size, workers_per_rank=workers, seed=seed + r,
                                       num_classes=len(split.classes) or None, net=NetOptions())
                            for r in range(rounds)] for name, split in sources.items()}
            epoch = min(plans["local"][0].steps_per_epoch(0), plans["http"][0].steps_per_epoch(0))
            warmup = min(2 * workers, epoch - 1)
            timed = (epoch - warmup) * batch_size
            results: dict[str, list[float]] = {"local": [], "http": []}
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for r in range(rounds):
                    for name in ("local", "http") if r % 2 == 0 else ("http", "local"):
                        results[name].append(measure_ours(plans[name][r], transform, warmup, timed)[0])
            finally:
                torch.set_num_threads(threads)
        shard_mb = sum(os.path.getsize(os.path.join(shards_dir, n)) for n in os.listdir(shards_dir)
                       if n.endswith(".tar")) / len(sources["local"].shards) / 1e6
    local, http = statistics.median(results["local"]), statistics.median(results["http"])
    return {"bench": "data-stream", "source": "http", "latency_ms": latency_ms, "mb_per_s_per_connection": mb_per_s,
            "shard_size": shard_size, "shard_mb": round(shard_mb, 2), "img_size": img_size, "workers": workers,
            "batch_size": batch_size, "rounds": rounds, "images_timed": timed,
            "local_img_s": round(local, 2), "http_img_s": round(http, 2), "ratio": round(http / local, 3),
            "local_rounds_img_s": [round(x, 2) for x in results["local"]],
            "http_rounds_img_s": [round(x, 2) for x in results["http"]], "goal": ">= 0.95",
            "requests": sum(faults.requests.values())}


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: run the benchmark and print its JSON line."""
    p = argparse.ArgumentParser(prog="python -m trainer.bench data --source http", description=__doc__.split("\n")[0])
    p.add_argument("--source", choices=["http"], default="http")
    p.add_argument("--latency-ms", type=float, default=50, help="added to every request (default 50)")
    p.add_argument("--mb-per-s", type=float, default=20, help="bandwidth cap per connection (default 20)")
    p.add_argument("--shard-size", type=int, default=256, help="JPEGs per shard (default 256)")
    p.add_argument("--img-size", type=int, default=384, help="training resolution and JPEG bound (default 384)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per side; medians reported (default 3)")
    args = p.parse_args(argv)
    result = run_stream_bench(args.img_size, args.workers, args.batch_size, args.shard_size, args.latency_ms,
                              args.mb_per_s, args.rounds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
