"""Guarantees 1-3 of the reliability issue, with real 2-rank DeepSpeed runs killed by trainer.infra.faults.

One uninterrupted reference run, and one run killed four times on its way to the same 12 steps
(checkpoints every 3 steps, keep 2):

    L1 rank 1 kill -9 after step 7                      -> checkpoints 3, 6 complete
    L2 the whole job (launcher, ranks, data workers) kill -9'd while saving checkpoint 9, before any
       model file                                       -> 9 torn: an empty directory
    L3 rank 1 killed after the DeepSpeed files of checkpoint 9, before its trainer state
                                                        -> 9 torn: rank 0's state only
    L4 rank 0 killed before the COMPLETE marker of 9    -> 9 torn: every file but the marker
    L5 runs to the end                                  -> checkpoints 9, 12

Every restart must resume from the newest complete checkpoint, and the per-step losses and the sample
stream (2 data workers per rank) must equal the reference run's exactly. Negative controls resume L1's
state forgetting the data position or the RNG, and must fail the same comparison. Disk-full saves
start from L1's state too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from tests.helpers import make_shards
from tests.launch import kill_tree, read_keys, run_training, start_training, train_records, trainer_states
from trainer.infra import checkpoint as ckpt

# The module fixture runs 7 launches; its time counts against the first test.
pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, EVERY = 12, 3
SHARDS, PER_SHARD = 8, 8
STEPS_PER_EPOCH = 8  # 64 samples / (2 ranks x batch 4): each of the 4 data workers reads 2 shards
TERMS = ("loss", "ce", "kd", "tok", "ratio", "grad_norm")


@dataclass
class Stage:
    fault: str
    output: str
    complete: list[str]
    torn: list[str]
    torn_files: list[str]  # files of the first torn checkpoint


def _stage(fault: str, output: str, run_dir: str) -> Stage:
    root = os.path.join(run_dir, "checkpoints")
    torn = ckpt.incomplete_checkpoints(root)
    return Stage(fault, output, _names(ckpt.complete_checkpoints(root)), _names(torn),
                 sorted(os.listdir(torn[0])) if torn else [])


def _overrides(shards: str, run_dir: str) -> list[str]:
    return [f"data.train={shards}", "data.val=", f"run.dir={run_dir}", "log.every=1", f"ckpt.every={EVERY}",
            f"train.steps={STEPS}", "ckpt.keep=2", "data.workers=2", "data.log_keys=true"]


def _names(paths: list[str]) -> list[str]:
    return [os.path.basename(p) for p in paths]


def _launch(shards: str, run_dir: str, fault: str | None, env: dict | None = None, ok: bool = False) -> Stage:
    env = {**(env or {}), **({"PRUNEVIT_FAULT": fault} if fault else {})}
    proc = run_training("torchrun", 2, _overrides(shards, run_dir), env=env, check=ok)
    out = proc.stdout + proc.stderr
    assert ok or proc.returncode != 0, f"{fault}: the fault did not stop the run\n{out[-3000:]}"
    return _stage(fault or "", out, run_dir)


def _kill_whole_job_at(shards: str, run_dir: str, point: str, step: int, timeout: float = 240) -> Stage:
    """Every rank pauses at the fault point; then the launcher and all its descendants get SIGKILL at once."""
    log_path = os.path.join(run_dir, f"whole_job_{point}_{step}.log")
    proc = start_training("torchrun", 2, _overrides(shards, run_dir),
                          env={"PRUNEVIT_FAULT": f"{point}:{step}:*:pause"}, log_path=log_path)
    deadline = time.time() + timeout
    try:
        while _log(log_path).count(f"pause at {point} step {step}") < 2:  # both ranks are there
            assert proc.poll() is None, f"the run ended before {point} {step}:\n{_log(log_path)[-3000:]}"
            assert time.time() < deadline, f"{point} {step} not reached in {timeout} s"
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    return _stage(f"whole job at {point}:{step}", _log(log_path), run_dir)


def _log(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_shards(str(root / "shards"), [PER_SHARD] * SHARDS, num_classes=4)
    shards = str(root / "shards" / "train-*.tar")
    ref, run = str(root / "ref"), str(root / "run")
    _launch(shards, ref, None, ok=True)
    stages = [_launch(shards, run, "after_step:7:1")]
    snapshot = str(root / "after_L1")
    shutil.copytree(run, snapshot)
    stages.append(_kill_whole_job_at(shards, run, "ckpt_before_model", 9))
    stages.append(_launch(shards, run, "ckpt_between_ranks:9:1"))
    stages.append(_launch(shards, run, "ckpt_before_marker:9:0"))
    stages.append(_launch(shards, run, None, ok=True))
    return {"root": root, "shards": shards, "ref": ref, "run": run, "stages": stages, "after_L1": snapshot}


def _fresh_copy(runs, name: str) -> str:
    out = str(runs["root"] / name)
    shutil.copytree(runs["after_L1"], out)
    return out


def _assert_same_losses(a: str, b: str, steps: range) -> None:
    ra, rb = train_records(a), train_records(b)
    for s in steps:
        for term in TERMS:
            assert ra[s][term] == rb[s][term], (s, term, ra[s][term], rb[s][term])


def test_killed_runs_resume_from_the_newest_complete_checkpoint_and_match_an_uninterrupted_run(runs):
    stages = runs["stages"]
    resumed_at = [None] + [_resumed_step(s.output) for s in stages[1:]]
    assert resumed_at == [None, 6, 6, 6, 6], [s.output[-2000:] for s in stages]
    _assert_same_losses(runs["ref"], runs["run"], range(1, STEPS + 1))  # bitwise: CPU, fixed seeds
    final = [trainer_states(os.path.join(d, "checkpoints", ckpt.tag_for(STEPS))) for d in (runs["ref"], runs["run"])]
    assert [s["param_checksum"] for s in final[0]] == [s["param_checksum"] for s in final[1]]
    print(f"{len(stages) - 1} kills ({', '.join(s.fault for s in stages[:-1])}); resumed at {resumed_at[1:]}; "
          f"losses of all {STEPS} steps bitwise equal to the uninterrupted run, final weights equal")


def _resumed_step(output: str) -> int | None:
    for line in output.splitlines():
        if line.startswith("resumed from "):
            return int(line.rsplit(" ", 1)[1])
    return None


def _epoch_problems(run_dir: str) -> list[str]:
    """Samples lost or repeated within an epoch, over both ranks (every sample once per epoch)."""
    problems = []
    streams = [read_keys(run_dir, r) for r in (0, 1)]
    for epoch, steps in enumerate((range(1, 9), range(9, STEPS + 1))):
        seen = Counter(k for stream in streams for s, k in stream if s in steps)
        repeated = sorted(k for k, n in seen.items() if n > 1)
        expected = 4 * 2 * len(steps)  # batch 4 x 2 ranks per step
        if repeated or sum(seen.values()) != expected or (epoch == 0 and len(seen) != SHARDS * PER_SHARD):
            problems.append(f"epoch {epoch}: {sum(seen.values())}/{expected} samples, {len(seen)} distinct, "
                            f"repeated {repeated[:5]}")
    return problems


def test_the_sample_stream_continues_with_nothing_lost_or_repeated(runs):
    for rank in (0, 1):
        assert read_keys(runs["run"], rank) == read_keys(runs["ref"], rank), f"rank {rank} stream differs"
    assert _epoch_problems(runs["ref"]) == []
    assert _epoch_problems(runs["run"]) == []
    n = sum(len(read_keys(runs["run"], r)) for r in (0, 1))
    print(f"sample stream after 4 kills, 2 workers per rank: {n} samples, identical to the uninterrupted run, "
          f"0 lost or repeated within an epoch")


def test_negative_controls_a_resume_that_forgets_data_position_or_rng_is_caught(runs):
    """The checks above must fail for a resume that restarts the data stream, or the per-step RNG."""
    forgot_data = _fresh_copy(runs, "forget_data")
    _launch(runs["shards"], forgot_data, None, env={"PRUNEVIT_DEBUG_RESUME": "forget_data"}, ok=True)
    assert read_keys(forgot_data, 0) != read_keys(runs["ref"], 0)
    assert _epoch_problems(forgot_data), "a restarted data stream repeats samples within the epoch"
    with pytest.raises(AssertionError):
        _assert_same_losses(runs["ref"], forgot_data, range(7, STEPS + 1))

    forgot_rng = _fresh_copy(runs, "forget_rng")
    _launch(runs["shards"], forgot_rng, None, env={"PRUNEVIT_DEBUG_RESUME": "forget_rng"}, ok=True)
    assert [read_keys(forgot_rng, r) for r in (0, 1)] == [read_keys(runs["ref"], r) for r in (0, 1)]
    _assert_same_losses(runs["ref"], forgot_rng, range(1, 7))  # before the resume: the same run
    with pytest.raises(AssertionError):
        _assert_same_losses(runs["ref"], forgot_rng, range(7, STEPS + 1))
    print(f"negative controls: forget_data -> {_epoch_problems(forgot_data)}; forget_rng -> losses differ from "
          f"step 7 on: {train_records(forgot_rng)[7]['loss']} vs {train_records(runs['ref'])[7]['loss']}")


def test_torn_checkpoints_are_ignored_reported_and_never_cost_an_older_complete_one(runs):
    l1, l2, l3, l4, l5 = runs["stages"]
    step, run = ckpt.tag_for, runs["run"]
    # What each kill left behind: complete checkpoints (keep=2) and torn ones; 3 goes only once 9 and
    # 12 are complete.
    assert (l1.complete, l1.torn) == ([step(3), step(6)], [])
    for stage in (l2, l3, l4):
        assert (stage.complete, stage.torn) == ([step(3), step(6)], [step(9)]), stage.fault
    assert (l5.complete, l5.torn) == ([step(9), step(12)], [])
    for stage in (l3, l4, l5):  # each restart names the torn checkpoint it skipped
        torn = os.path.join(run, "checkpoints", step(9))
        assert f"ignoring incomplete checkpoint (no COMPLETE marker, a save was interrupted): {torn}" in stage.output
    # The three torn states: nothing written; one rank's trainer state missing; only the marker missing.
    ds_files = {"mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert l2.torn_files == []
    assert set(l3.torn_files) == ds_files | {"trainer_state_rank0.json"}
    assert set(l4.torn_files) == ds_files | {"trainer_state_rank0.json", "trainer_state_rank1.json"}
    with open(os.path.join(run, "summary.json")) as f:
        assert json.load(f)["ignored_checkpoints"] == [step(9)]
    print(f"3/3 torn checkpoints ignored and reported ({[len(s.torn_files) for s in (l2, l3, l4)]} files in "
          f"them); every restart resumed from {step(6)}; {step(3)} deleted only after {step(9)}, {step(12)} completed")


def test_a_failed_write_fails_every_rank_quickly_naming_the_path_and_spares_the_previous_checkpoint(runs):
    """Rank 1's file writes fail in the kernel (RLIMIT_FSIZE: EFBIG) inside DeepSpeed's save of
    checkpoint 9 while rank 0 waits in DeepSpeed's barrier; then rank 0 cannot write the marker (ENOSPC)."""
    for name, fault in (("efbig", "ckpt_before_model:9:1:fsize"), ("enospc", "ckpt_before_marker:9:0:enospc")):
        run_dir = _fresh_copy(runs, name)
        root = os.path.join(run_dir, "checkpoints")
        before = _checksums(root)
        t0 = time.time()
        stage = _launch(runs["shards"], run_dir, fault)
        elapsed = time.time() - t0
        assert elapsed < 120, f"{name}: {elapsed:.0f} s"
        print(f"{name} at {fault}: run (resume + 3 steps + failed save) exited in {elapsed:.1f} s")
        path = os.path.join(root, ckpt.tag_for(9))
        for rank in (0, 1):  # a line of its own from every rank (torch prefixes tracebacks with [rank<r>]:)
            assert any(line.startswith((f"rank {rank}: ", f"[rank{rank}]: ")) and path in line
                       for line in stage.output.splitlines()), (name, rank, stage.output[-3000:])
        assert "CheckpointError" in stage.output
        assert _checksums(root, skip=ckpt.tag_for(9)) == before, f"{name}: the previous checkpoints changed"
        assert ckpt.find_latest(root) == os.path.join(root, ckpt.tag_for(6))
        assert stage.torn == [ckpt.tag_for(9)]


def _checksums(root: str, skip: str = "") -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(root):
        if skip and skip in dirpath:
            continue
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out
