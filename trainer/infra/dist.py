"""Rank helpers that also work in a single process without a process group (composer/nanochat style)."""

from __future__ import annotations

import hashlib
import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True once a process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group; the launcher's RANK before it starts)."""
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks (1 without a process group; the launcher's WORLD_SIZE before it starts)."""
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank within the node, from the launcher's environment."""
    return int(os.environ.get("LOCAL_RANK", 0))


def node_rank() -> int:
    """Index of this rank's node, as the launcher numbers nodes (hostnames may repeat, e.g. two nodes on one host)."""
    for var in ("GROUP_RANK", "CROSS_RANK", "NODE_RANK", "SLURM_NODEID"):  # torchrun, deepspeed, srun, srun
        if var in os.environ:
            return int(os.environ[var])
    return 0


def free_port() -> int:
    """A local TCP port nobody listens on right now (for a rendezvous this process starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_process_env() -> None:
    """Without a launcher, describe a world of one so process groups start without MPI discovery."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    port = free_port()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))


def print0(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    """Barrier across ranks; a no-op in one process."""
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """Destroy the process group at the end of a successful run (a no-op in one process).

    Without it, gloo's worker threads still hold work objects when the interpreter finalizes and a rank
    can die with SIGABRT ("terminate called without an active exception") after training finished.
    Called on success only: a rank that failed must not enter a collective teardown its peers may never
    reach (the torchtitan convention).
    """
    if is_dist():
        dist.destroy_process_group()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (sum, max or min) of a tensor; identity in one process."""
    if is_dist():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
            # NCCL reduces CUDA tensors only; the loop's small CPU counters and sums take a round trip.
            on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_device, op=ops[op])
            tensor.copy_(on_device)
        else:
            dist.all_reduce(tensor, op=ops[op])
    return tensor


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if `flag` is True on any rank (so all ranks take the same branch)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce(t, "max").item() > 0)


def same_on_all_ranks(text: str, device: torch.device | str = "cpu") -> bool:
    """True on every rank if every rank passed the same `text` (one all-reduce of a 62-bit hash)."""
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2
    t = torch.tensor([h, -h], dtype=torch.int64, device=device)
    all_reduce(t, "max")  # max(h) == h and max(-h) == -h on every rank only when all hashes are equal
    return int(t[0]) == h and int(t[1]) == -h
