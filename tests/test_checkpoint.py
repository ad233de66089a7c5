"""Checkpoint bookkeeping: only complete checkpoints count, `latest`, retention, torn writes ignored."""

import os

import pytest
import torch

from trainer.infra import checkpoint as ckpt
from trainer.infra.backends.base import Backend


class FileBackend(Backend):
    """A real (single-process) backend that saves a tensor file; enough to exercise the bookkeeping."""

    name = "file"
    device = torch.device("cpu")

    def __init__(self, fail_on_save: bool = False):
        self.weight = torch.zeros(3)
        self.fail_on_save = fail_on_save

    @classmethod
    def from_config(cls, cfg, world_size):
        return cls()

    @staticmethod
    def consolidated_weights(directory, allow_pickle=False):
        return torch.load(os.path.join(directory, "weights.pt"), weights_only=True)

    def prepare(self, model, optimizer):
        pass

    model = module = property(lambda self: None)
    param_groups = property(lambda self: [])

    def backward(self, loss):
        pass

    def step(self):
        return {}

    def save(self, directory):
        if self.fail_on_save:
            raise OSError(28, "No space left on device")
        torch.save({"w": self.weight}, os.path.join(directory, "weights.pt"))

    def load(self, directory):
        self.weight = torch.load(os.path.join(directory, "weights.pt"), weights_only=True)["w"]


def test_only_complete_checkpoints_are_found_and_latest_points_to_the_newest(tmp_path):
    root = str(tmp_path)
    backend = FileBackend()
    for step in (2, 4):
        backend.weight += 1
        ckpt.save_checkpoint(backend, root, step, {"step": step}, keep=3)
    assert ckpt.find_latest(root).endswith("step_00000004")
    os.makedirs(os.path.join(root, ckpt.tag_for(6)))  # a torn write: files but no marker
    open(os.path.join(root, ckpt.tag_for(6), "weights.pt"), "w").close()
    assert ckpt.find_latest(root).endswith("step_00000004")
    assert ckpt.incomplete_checkpoints(root) == [os.path.join(root, ckpt.tag_for(6))]
    with open(os.path.join(root, ckpt.LATEST), "w") as f:
        f.write(ckpt.tag_for(6))  # even a pointer to a torn checkpoint is not followed
    assert ckpt.find_latest(root).endswith("step_00000004")
    restored = FileBackend()
    restored.load(ckpt.find_latest(root))
    assert torch.equal(restored.weight, torch.full((3,), 2.0))
    assert ckpt.load_trainer_state(ckpt.find_latest(root), 0) == {"step": 4}


def test_old_checkpoints_are_deleted_only_after_a_newer_one_is_complete(tmp_path):
    root = str(tmp_path)
    backend = FileBackend()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(backend, root, step, {"step": step}, keep=2)
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    failing = FileBackend(fail_on_save=True)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000004 failed: OSError: \[Errno 28\] No space left.*"
                                                   r"previous complete checkpoint \(.*step_00000003\) is untouched"):
        ckpt.save_checkpoint(failing, root, 4, {"step": 4}, keep=2)
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    assert ckpt.find_latest(root).endswith("step_00000003")
