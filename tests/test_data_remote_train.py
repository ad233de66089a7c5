"""Training and evaluation on remote shards with real ranks: an HTTP folder in timm's layout (2 ranks, a kill
and an exact resume), a `pipe:curl` pattern carrying a secret header that must appear nowhere, and a shard
that fails on only one rank's share."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from data.http_server import ServerFaults, ShardServer
from tests.launch import REPO, read_keys, run_training, train_records
from tests.test_data_remote import timm_layout

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 8
TERMS = ("loss", "ce", "kd", "tok", "ratio")


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("wds"))
    timm_layout(root, train=8, val=2)
    return root


def _overrides(source: str, run_dir: str, *extra: str) -> list[str]:
    return [f"data.train={source}", f"data.val={source}", f"run.dir={run_dir}", "log.every=1", "ckpt.every=3",
            f"train.steps={STEPS}", "data.workers=1", "data.log_keys=true", "data.retries=3", "data.backoff=0.05",
            *extra]


def test_two_ranks_train_over_http_and_a_killed_run_resumes_exactly(layout, tmp_path):
    """data.train=data.val=http://.../ (a folder with timm's _info.json: train + validation, no settings)."""
    with ShardServer(layout) as server:
        ref = str(tmp_path / "ref")
        run_training("torchrun", 2, _overrides(server.url, ref))
        run = str(tmp_path / "run")
        killed = run_training("torchrun", 2, _overrides(server.url, run), env={"PRUNEVIT_FAULT": "after_step:5:1"},
                              check=False)
        assert killed.returncode != 0
        resumed = run_training("torchrun", 2, _overrides(server.url, run))
        # trainer.evaluate agrees with training: the same folder URL, timm's "validation" found without settings.
        evaluated = subprocess.run([sys.executable, "-m", "trainer.evaluate", "--checkpoint", run, "--data",
                                    server.url], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["count"] == 16
    assert "at step 3" in resumed.stdout
    a, b = train_records(ref), train_records(run)
    for step in range(1, STEPS + 1):
        for term in TERMS:
            assert a[step][term] == b[step][term], (step, term)
    for rank in (0, 1):
        assert read_keys(run, rank) == read_keys(ref, rank), f"rank {rank} consumed other samples"
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["count"] == 16 and summary["eval_skipped"] == 0  # the validation split, over HTTP
    print(f"http: {STEPS} steps, killed after 5, resumed at 3: losses and {len(read_keys(run, 0))} keys per rank equal")


def test_pipe_curl_with_a_secret_header_trains_and_the_secret_appears_nowhere(layout, tmp_path):
    with ShardServer(layout) as server:
        header = "-H 'Authorization: Bearer TOPSECRET'"
        source = f"pipe:curl -s -f {header} {server.url}imagenet1k-train-{{0000..0007}}.tar"
        run_dir = str(tmp_path / "pipe")
        done = run_training("torchrun", 2, _overrides(source, run_dir, "data.val=", "data.count_samples=true"))
    assert len(train_records(run_dir)) == STEPS
    leaks = [path for path in glob.glob(os.path.join(run_dir, "**", "*"), recursive=True)
             if os.path.isfile(path) and b"TOPSECRET" in open(path, "rb").read()]
    assert not leaks, f"the secret header leaked into {leaks}"
    assert "TOPSECRET" not in done.stdout + done.stderr
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert "Authorization: ***" in f.read()


def test_a_shard_failing_on_one_ranks_share_is_counted_and_both_ranks_still_agree(layout, tmp_path):
    """One train shard answers 500 every time: the rank reading it skips it (unreachable_shard), its worker
    refills from its other shards, and both ranks run the same number of steps."""
    faults = ServerFaults(first={"imagenet1k-train-0003.tar": ("500", 10_000)})
    with ShardServer(layout, faults) as server:
        run_dir = str(tmp_path / "failing")
        run_training("torchrun", 2, _overrides(server.url, run_dir, "data.val=", "data.max_skip_fraction=0.5",
                                               "data.retries=1"))
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == STEPS
    assert summary["skipped_samples"]["unreachable_shard"] >= 1
    last = train_records(run_dir)[STEPS]
    assert last["data/skipped_unreachable_shard"] == summary["skipped_samples"]["unreachable_shard"]
    print(f"unreachable_shard counted {summary['skipped_samples']['unreachable_shard']} time(s); {STEPS} steps")


@pytest.fixture(scope="module")
def s3_bucket(layout):
    """The shards in a bucket of moto's S3 server on 127.0.0.1; yields the environment that points AWS tools at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="shards")
    for name in os.listdir(layout):
        s3.upload_file(os.path.join(layout, name), "shards", f"imagenet-wds/{name}")
    yield env
    server.stop()


def test_two_ranks_train_and_evaluate_from_s3(s3_bucket, tmp_path):
    """s3://bucket/folder/ through fsspec (s3fs), credentials and endpoint from the AWS environment."""
    run_dir = str(tmp_path / "s3")
    run_training("torchrun", 2, _overrides("s3://shards/imagenet-wds/", run_dir, "train.steps=4", "ckpt.every=4"),
                 env=s3_bucket)
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["steps"] == 4 and summary["count"] == 16
    assert sum(summary["skipped_samples"].values()) == 0
    print(f"s3: 4 steps on 2 ranks, eval of {summary['count']:.0f} validation samples")


def test_a_missing_fsspec_says_how_to_install_it():
    import subprocess
    import sys

    code = ("import sys; sys.modules['fsspec'] = None\n"
            "from data.info import resolve_split\nresolve_split('s3://b/x/', 'train')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode != 0 and "pip install 'prunevit[remote]'" in done.stderr, done.stderr[-2000:]
