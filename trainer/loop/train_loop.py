"""The training loop, top to bottom: build the run, then step, log, checkpoint and evaluate until done."""

from __future__ import annotations

import os
import time

import torch
import yaml

from trainer.config import Config
from trainer.infra import checkpoint as ckpt
from trainer.infra import dist, faults
from trainer.infra.preemption import GracefulStop
from trainer.loop.build import Run, build_ema_model, build_run, printable_config
from trainer.loop.eval_loop import evaluate
from trainer.loop.metrics import KeyLog, MetricsLogger, write_json
from trainer.loop.optim import apply_lr
from trainer.loop.step import BadSteps, train_step
from trainer.loop.visualize import overlay_grid
from trainer.loop.window import MetricsWindow, rank_summed_skips


def train(cfg: Config) -> dict:
    """Run training as configured; returns the summary (also written to <run>/summary.json)."""
    start_time = time.time()
    stop = GracefulStop.install()  # SIGTERM/SIGUSR1: checkpoint at the next step boundary, then exit
    run = build_run(cfg)
    backend, step = run.backend, run.start_step
    log = MetricsLogger(cfg.run_dir, dist.rank() == 0, run.steps, step, cfg.log.tensorboard, cfg.log.progress)
    log.text("config", "```yaml\n" + yaml.safe_dump(printable_config(cfg), sort_keys=False) + "\n```")
    keys_log = KeyLog(cfg.run_dir, dist.rank(), step) if cfg.data.log_keys else None
    bad = BadSteps(cfg.train.max_bad_steps, cfg.precision == "fp16", run.bad_steps, run.skipped_steps)
    window = MetricsWindow()
    batches = iter(run.loader)
    last_eval: dict = {}

    while step < run.steps:
        backend.model.train()
        lrs = apply_lr(backend.param_groups, step, run.schedule)
        result = train_step(run, batches, step, window, keys_log)
        if run.ema is not None:
            run.ema.update()
        step += 1
        log.advance()
        bad.record(step, result)
        window.add_update(result)

        saved = (cfg.ckpt.every and step % cfg.ckpt.every == 0) or step == run.steps
        logged = step % cfg.log.every == 0 or step == run.steps
        if logged or saved:  # the host reads the device's values only here (and at evals)
            bad.settle(backend.name, backend.device)
        if logged or bad.failure is not None:
            log.log(step, window.reduce(cfg.data.batch_size) | train_counters(run, bad, lrs))
            window.reset()
        if bad.failure is not None:
            raise bad.failure
        if saved:
            save(run, step, bad)
        if stop.agreed(step) and step < run.steps:
            if not saved:
                bad.settle(backend.name, backend.device)
                if bad.failure is not None:
                    raise bad.failure
                save(run, step, bad)
            dist.print0(f"stopped after step {step} ({stop.signal_name}); run the same command to resume")
            break
        if run.eval_loader is not None and ((cfg.log.eval_every and step % cfg.log.eval_every == 0)
                                            or step == run.steps):
            last_eval = run_eval(run, log, step)
        faults.hit("after_step", step)

    if keys_log is not None:
        keys_log.close()
    summary = {"steps": step, "wall_seconds": round(time.time() - start_time, 2), "world_size": dist.world_size(),
               "backend": backend.name, "precision": cfg.precision, "gate": cfg.prune.gate,
               "gmacs_dense": run.dense_gmacs, "bad_steps": bad.total, "skipped_steps": bad.skipped_total,
               "ignored_checkpoints": run.ignored_checkpoints, "skipped_samples": rank_summed_skips(run.loader),
               "stopped_early": step < run.steps, **last_eval}
    if dist.rank() == 0:
        write_json(os.path.join(cfg.run_dir, "summary.json"), summary)
    log.close()
    dist.barrier()
    return summary


def train_counters(run: Run, bad: BadSteps, lrs: dict[str, float]) -> dict[str, float]:
    """The log step's scalars besides the window means: LRs, skipped samples and steps, the fp16 loss scale."""
    scalars = {f"lr/{name}": lr for name, lr in lrs.items()}
    scalars.update({f"data/skipped_{k}": float(v) for k, v in rank_summed_skips(run.loader).items()})
    scalars["bad_steps"] = float(bad.total)
    scalars["skipped_steps"] = float(bad.skipped_total)
    if run.backend.loss_scale() is not None:
        scalars["loss_scale"] = run.backend.loss_scale()
    if faults.active():
        scalars.update(faults.param_sums_by_rank(run.backend))
    return scalars


def save(run: Run, step: int, bad: BadSteps) -> None:
    """A complete checkpoint of step `step`: the backend's files plus this rank's trainer state."""
    state = {"step": step, "data": run.loader.state_dict(), "bad_steps": bad.total,
             "skipped_steps": bad.skipped_total, "backend": run.backend.name,
             "param_checksum": faults.param_checksum(run.student), "rank": dist.rank(),
             "world_size": dist.world_size(), "local_rank": dist.local_rank(),
             "node_rank": dist.node_rank()}
    path = ckpt.save_checkpoint(run.backend, run.ckpt_root, step, state, run.cfg.ckpt.keep, ema=run.ema)
    dist.print0(f"saved checkpoint {path}")


def run_eval(run: Run, log: MetricsLogger, step: int) -> dict:
    """Evaluate student and teacher on the eval loader, log it (with kept-token overlays), back to train mode."""
    cfg = run.cfg

    def overlays(batch: dict, _x: torch.Tensor) -> None:
        grid = overlay_grid(batch["image"], run.student.last_keep_indices or [],
                            run.student.vit.patch_embed.grid_size, cfg.log.token_images)
        if grid is not None:
            log.image("eval/kept_tokens", grid, step)

    result = evaluate(run.backend.model, run.student, run.eval_loader, run.device_aug.normalize, run.backend.device,
                      run.backend.input_dtype, cfg.model.img_size, run.teacher, teacher_dtype=run.teacher_dtype,
                      on_first_batch=overlays if cfg.log.token_images else None)
    if run.ema is not None:
        result |= evaluate_ema(run)
    run.backend.model.train()
    log.log(step, result, kind="eval")
    return result


def evaluate_ema(run: Run) -> dict[str, float]:
    """The EMA weights' top-1/top-5, GMACs and keep ratios, under `ema_*` keys (all ranks call)."""
    weights = run.ema.full_state_dict(run.backend.device)
    if run.ema_model is None:
        run.ema_model = build_ema_model(run.cfg, run.backend.device)
    run.ema_model.load_state_dict(weights, strict=True)
    result = evaluate(run.ema_model, run.ema_model, run.eval_loader, run.device_aug.normalize, run.backend.device,
                      torch.float32, run.cfg.model.img_size)
    return {"ema_" + key.removeprefix("student_"): value for key, value in result.items()
            if key.startswith(("student_", "keep_ratio/"))}
