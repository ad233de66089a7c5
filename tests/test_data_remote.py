"""Shards from where users keep them: timm's split names, HTTP(S) folders and patterns, `pipe:` commands, and
the network faults (drops, 404/500, stalls) retried, counted and redacted. The server is data.http_server on
127.0.0.1 serving real shards."""

from __future__ import annotations

import os
import shutil

import pytest

from data.http_server import ServerFaults, ShardServer
from data.info import resolve_split, write_info
from data.sources import NetOptions, RetryingReader, ShardUnreachable, open_shard, redact
from data.stream import SkipTally, read_shards
from tests.helpers import make_shards

FAST = NetOptions(connect_timeout=5, read_timeout=1.0, retries=3, backoff=0.01, backoff_max=0.05)


def timm_layout(root: str, train: int = 4, val: int = 2, per_shard: int = 8) -> dict[str, list[str]]:
    """Shards named and indexed like timm/imagenet-1k-wds: imagenet1k-{train,validation}-NNNN.tar + _info.json."""
    names: dict[str, list[str]] = {}
    for split, count in (("train", train), ("validation", val)):
        paths = make_shards(root, [per_shard] * count, num_classes=4, prefix=f"imagenet1k-{split}")
        names[split] = []
        for k, path in enumerate(paths):
            name = f"imagenet1k-{split}-{k:04d}.tar"
            os.replace(path, os.path.join(root, name))
            names[split].append(name)
    write_info(root, {"name": "imagenet-1k-wds", "splits": {
        split: {"name": split, "filenames": files, "shard_lengths": [per_shard] * len(files),
                "num_samples": per_shard * len(files)} for split, files in names.items()}})
    return names


@pytest.fixture
def layout(tmp_path):
    root = str(tmp_path / "wds")
    timm_layout(root)
    return root


def test_redact_removes_credentials_from_urls_and_pipe_commands():
    assert redact("https://user:secret@host/x/") == "https://***@host/x/"
    assert redact("https://bucket.s3.amazonaws.com/a.tar?X-Amz-Signature=abc&X-Amz-Credential=k") == \
        "https://bucket.s3.amazonaws.com/a.tar?***"
    cmd = "pipe:curl -s -L -H 'Authorization: Bearer hf_abcdef' https://huggingface.co/x/{0..3}.tar"
    assert redact(cmd) == "pipe:curl -s -L -H 'Authorization: ***' https://huggingface.co/x/{0..3}.tar"
    assert "hunter2" not in redact("pipe:curl --user me:hunter2 https://h/a.tar")
    for leaky in ("pipe:curl -u alice:hunter2 https://h/a.tar", "pipe:curl -sH 'Authorization: Bearer hunter2' x.tar",
                  "pipe:wget --http-password=hunter2 -O- https://h/a.tar",
                  "pipe:AWS_SECRET_ACCESS_KEY=hunter2 aws s3 cp s3://b/a.tar -"):
        assert "hunter2" not in redact(leaky), redact(leaky)


def test_cache_file_names_never_carry_a_query_or_a_command(tmp_path):
    from data.cache import cache_path

    for source in ("https://b.s3.amazonaws.com/w/x-0001.tar?X-Amz-Signature=hunter2",
                   "pipe:curl -fsSL https://h/w/x-0001.tar -H 'Authorization: Bearer hunter2'"):
        name = os.path.basename(cache_path(str(tmp_path), source))
        assert name.endswith("-x-0001.tar") and "hunter2" not in name, name
    assert redact("/data/imagenet/train-{0000..0009}.tar") == "/data/imagenet/train-{0000..0009}.tar"


def test_timm_split_names_work_without_settings(layout):
    assert len(resolve_split(layout, "val").shards) == 2  # ours, finding timm's "validation"
    assert len(resolve_split(layout, "validation").shards) == 2
    assert resolve_split(layout, "train").num_samples == 32
    with pytest.raises(ValueError, match="no split 'test'.*data.train_split"):
        resolve_split(layout, "test")


def test_a_partial_download_says_how_to_train_on_the_shards_present(layout):
    os.remove(os.path.join(layout, "imagenet1k-train-0003.tar"))
    partial = r"1 of the 4 shard\(s\).*train on the 3 present.*imagenet1k-train-\*\.tar"
    with pytest.raises(FileNotFoundError, match=partial):
        resolve_split(layout, "train")
    present = resolve_split(os.path.join(layout, "imagenet1k-train-*.tar"), "train")
    assert [s.num_samples for s in present.shards] == [8, 8, 8]


def test_http_folder_and_url_patterns_resolve_with_counts_from_info_json(layout):
    with ShardServer(layout) as server:
        folder = resolve_split(server.url, "val", FAST)
        assert [s.path for s in folder.shards] == [server.url + f"imagenet1k-validation-{k:04d}.tar" for k in (0, 1)]
        pattern = resolve_split(server.url + "imagenet1k-train-{0000..0003}.tar", "train", FAST)
        assert [s.num_samples for s in pattern.shards] == [8, 8, 8, 8]


def test_remote_shards_without_counts_are_refused_unless_counted(layout):
    os.remove(os.path.join(layout, "_info.json"))
    with ShardServer(layout) as server:
        spec = server.url + "imagenet1k-train-{0000..0003}.tar"
        with pytest.raises(ValueError, match="sample counts of 4 remote shard.*data.count_samples=true"):
            resolve_split(spec, "train", FAST)
        assert resolve_split(spec, "train", FAST, count_samples=True).num_samples == 32
    pipe = "pipe:cat " + os.path.join(layout, "imagenet1k-train-{0000..0003}.tar")
    assert [s.num_samples for s in resolve_split(pipe, "train", FAST, count_samples=True).shards] == [8] * 4


@pytest.mark.parametrize("fault", ["drop", "500", "404", "stall"])
def test_each_network_fault_is_retried_and_the_bytes_come_out_whole(layout, fault):
    name = "imagenet1k-train-0000.tar"
    with open(os.path.join(layout, name), "rb") as f:
        expected = f.read()
    faults = ServerFaults(first={name: (fault, 2)}, stall_s=5)
    with ShardServer(layout, faults) as server:
        reader = RetryingReader(server.url + name, FAST)
        got = b"".join(iter(lambda: reader.read(1 << 16), b""))
    assert got == expected
    assert reader.retried == 2 and faults.requests[name] == 3
    print(f"{fault}: 2 failures retried, {len(got)} bytes whole")


def test_a_shard_that_keeps_failing_is_skipped_and_counted_once_and_the_rest_streams(layout):
    bad = "imagenet1k-train-0001.tar"
    faults = ServerFaults(first={bad: ("500", 100)})
    with ShardServer(layout, faults) as server:
        shards = resolve_split(server.url, "train", FAST).shards
        tally = SkipTally()
        samples = list(read_shards(list(shards), tally, FAST))
        with pytest.raises(ShardUnreachable, match=r"imagenet1k-train-0001.tar: gave up after 3 retries"):
            open_shard(server.url + bad, FAST).read()
    assert len(samples) == 24 and dict(tally.by_kind) == {"unreachable_shard": 1}
    assert faults.requests[bad] == 1 + FAST.retries + 1 + FAST.retries  # the stream's reads, then the direct one


def test_pipe_sources_stream_and_a_failing_command_is_counted(layout):
    good = "pipe:cat " + os.path.join(layout, "imagenet1k-train-0000.tar")
    bad = "pipe:cat " + os.path.join(layout, "no-such-shard.tar")
    from data.info import Shard

    tally = SkipTally()
    samples = list(read_shards([Shard(good, 8), Shard(bad, 8)], tally, FAST))
    assert len(samples) == 8 and dict(tally.by_kind) == {"unreachable_shard": 1}
    assert all(s["__url__"] == good for s in samples)


def test_credentials_in_a_source_never_reach_the_skip_records(layout, tmp_path):
    from data.info import Shard

    secret = "pipe:curl -s -H 'Authorization: Bearer TOPSECRET' http://127.0.0.1:9/none.tar"
    tally = SkipTally()
    list(read_shards([Shard(secret, 8)], tally, NetOptions(retries=0, read_timeout=2)))
    assert tally.by_kind["unreachable_shard"] == 1
    assert not any("TOPSECRET" in shard for shard in tally.by_shard), dict(tally.by_shard)


def test_local_copies_still_read_directly(layout):
    shutil.copy(os.path.join(layout, "imagenet1k-train-0000.tar"), os.path.join(layout, "copy.tar"))
    with open_shard(os.path.join(layout, "copy.tar")) as stream:
        assert stream.read(4)


def _inspect(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "data.inspect", *args], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_inspect_prints_splits_counts_and_the_first_sample_locally_and_over_http(layout):
    import json

    local = _inspect(layout, "--split", "val")
    assert local.returncode == 0, local.stderr
    report = json.loads(local.stdout)
    assert report["splits"] == {"train": {"shards": 4, "samples": 32}, "validation": {"shards": 2, "samples": 16}}
    assert report["samples"] == 16 and report["first_sample"]["image_size"] == [40, 36]
    assert set(report["first_sample"]["fields"]) == {"jpg", "cls"}
    with ShardServer(layout) as server:
        remote = json.loads(_inspect(server.url).stdout)
    assert remote["shards"] == 4 and remote["first_sample"]["label"] in {"0", "1", "2", "3"}


def test_inspect_counts_a_pattern_and_writes_an_index_that_training_then_uses(layout, tmp_path):
    import json

    os.remove(os.path.join(layout, "_info.json"))
    with ShardServer(layout) as server:
        spec = server.url + "imagenet1k-train-{0000..0003}.tar"
        refused = _inspect(spec)
        assert refused.returncode == 2 and "data.count_samples=true" in refused.stderr
        wrote = _inspect(spec, "--write-info", layout)
        assert wrote.returncode == 0, wrote.stderr
        assert json.loads(wrote.stdout)["samples"] == 32
        assert resolve_split(spec, "train", FAST).num_samples == 32  # now from the _info.json beside them
    os.remove(os.path.join(layout, "_info.json"))
    pipe = f"pipe:cat {layout}/imagenet1k-train-{{0000..0003}}.tar"
    assert _inspect(pipe, "--write-info", str(tmp_path)).returncode == 0
    with open(tmp_path / "_info.json") as f:  # shard names, not the command's last word
        assert json.load(f)["splits"]["train"]["filenames"][0] == "imagenet1k-train-0000.tar"


def test_inspect_fails_cleanly_on_unreachable_and_malformed_sources(tmp_path):
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello, I am not a tar file" * 100)
    bad = _inspect(str(tmp_path / "not-a-tar.tar"), "--retries", "0")
    assert bad.returncode == 2 and "not-a-tar.tar" in bad.stderr and "Traceback" not in bad.stderr
    gone = _inspect("http://user:pw@127.0.0.1:9/shards/", "--retries", "0")
    assert gone.returncode == 2 and "Traceback" not in gone.stderr
    assert "pw" not in gone.stderr and "***@127.0.0.1:9" in gone.stderr, gone.stderr


def test_the_cache_serves_later_reads_from_disk_and_stays_within_its_bound(layout, tmp_path):
    from dataclasses import replace

    from data.cache import cache_path

    cache = str(tmp_path / "cache")
    names = [f"imagenet1k-train-{k:04d}.tar" for k in range(4)]
    size = os.path.getsize(os.path.join(layout, names[0]))
    opts = NetOptions(retries=1, backoff=0.01, cache_dir=cache, cache_max_gb=2.5 * size / 2**30)  # room for 2
    faults = ServerFaults()
    with ShardServer(layout, faults) as server:
        for name in names[:2]:
            with open_shard(server.url + name, opts) as stream:
                assert stream.read() == open(os.path.join(layout, name), "rb").read()
        assert sorted(os.listdir(cache)) == sorted(os.path.basename(cache_path(cache, server.url + n))
                                                   for n in names[:2])
        with open_shard(server.url + names[0], opts) as stream:  # a hit: no request, and now the newest
            stream.read()
        assert faults.requests[names[0]] == 1
        for name in names[2:]:
            with open_shard(server.url + name, opts) as stream:
                stream.read()
        kept = sorted(os.listdir(cache))
        faults.first[names[1]] = ("drop", 1)  # a broken read (no retries left): never published
        with pytest.raises(ShardUnreachable), open_shard(server.url + names[1], replace(opts, retries=0)) as broken:
            broken.read()
    assert len(kept) == 2 and os.path.basename(cache_path(cache, server.url + names[3])) in kept
    assert sorted(os.listdir(cache)) == kept, "a broken read left a file in the cache"
    assert sum(os.path.getsize(os.path.join(cache, n)) for n in kept) <= 2.5 * size


def test_ranks_filling_the_cache_at_once_leave_one_complete_copy(layout, tmp_path):
    import subprocess
    import sys

    cache = str(tmp_path / "cache")
    name = "imagenet1k-train-0000.tar"
    with ShardServer(layout, ServerFaults(bytes_per_s=200_000)) as server:
        code = (f"from data.sources import NetOptions, open_shard\n"
                f"s = open_shard({server.url + name!r}, NetOptions(cache_dir={cache!r})); s.read(); s.close()")
        procs = [subprocess.Popen([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))) for _ in range(3)]
        assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    files = os.listdir(cache)
    assert len(files) == 1 and not files[0].endswith(".part")
    assert open(os.path.join(cache, files[0]), "rb").read() == open(os.path.join(layout, name), "rb").read()


def test_a_pipe_pattern_reads_its_counts_with_the_same_command(layout):
    """`pipe:curl -H ... https://host/x/shard-{..}.tar`: the index is fetched by the same command, so the header
    (or an aws profile) applies to it too; here with cat and a local folder."""
    spec = "pipe:cat " + os.path.join(layout, "imagenet1k-train-{0000..0003}.tar")
    split = resolve_split(spec, "train", FAST)
    assert [s.num_samples for s in split.shards] == [8] * 4
    assert split.shards[0].path == "pipe:cat " + os.path.join(layout, "imagenet1k-train-0000.tar")
    with ShardServer(layout) as server:
        curl = f"pipe:curl -s -f -H 'Authorization: Bearer x' {server.url}imagenet1k-train-{{0000..0003}}.tar"
        assert resolve_split(curl, "train", FAST).num_samples == 32
