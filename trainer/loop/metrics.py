"""Where numbers go: metrics.jsonl, TensorBoard (rank 0 only), a tqdm bar or plain log lines, and the
debug key log; `read_metrics` reads metrics.jsonl back."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


class MetricsLogger:
    """Rank 0 writes; on other ranks every method is a no-op (a null logger, not `if rank == 0` everywhere)."""

    def __init__(self, run_dir: str, enabled: bool, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: str = "auto"):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        if use_bar:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._start = time.time()

    def text(self, tag: str, text: str) -> None:
        """A text panel (the resolved config)."""
        if self.writer is not None:
            self.writer.add_text(tag, text, 0)

    def log(self, step: int, scalars: dict[str, float], kind: str = "train") -> None:
        """One record: a JSON line, TensorBoard scalars under `<kind>/`, and the bar or a log line."""
        if not self.enabled:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
        record = {"step": step, "kind": kind, "time": round(time.time() - self._start, 3), **clean}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        if self.writer is not None:
            for key, value in clean.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
        shown = {k: v for k, v in clean.items() if k in ("loss", "top1", "student_top1", "lr/gate_decay")}
        line = " ".join(f"{k}={v:.4g}" for k, v in shown.items() if v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(line, refresh=False)
        else:
            print(f"[{kind}] step {step} {line}", flush=True)

    def advance(self, n: int = 1) -> None:
        """Move the progress bar."""
        if self.bar is not None:
            self.bar.update(n)

    def image(self, tag: str, image: np.ndarray | torch.Tensor, step: int) -> None:
        """An HWC uint8 image (kept-token overlays)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        """Flush and close files."""
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Pretty JSON (summary.json)."""
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=True)


def read_metrics(run_dir: str, kind: str = "train") -> list[dict]:
    """The records of one kind (`train` or `eval`) from a run's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


class KeyLog:
    """Debug (data.log_keys): `<run>/keys_rank<r>.txt`, one `<step> <key>` line per consumed sample.

    `step` is the 1-based optimizer step the sample trains; every (re)start first writes `# start
    step=<s>`, so a reader drops the lines after step s that a killed run wrote and its resume redid.
    Flushed per batch: a kill -9 loses no line and tears none.
    """

    def __init__(self, run_dir: str, rank: int, start_step: int):
        self.file = open(os.path.join(run_dir, f"keys_rank{rank}.txt"), "a")
        self.file.write(f"# start step={start_step}\n")

    def write(self, step: int, keys: Sequence[str]) -> None:
        self.file.write("".join(f"{step} {k}\n" for k in keys))
        self.file.flush()

    def close(self) -> None:
        self.file.close()
