"""`make demo-sweep` (`python -m trainer.demo.sweep`): top-1 against GMACs for both gates, the papers' main figure.

    python -m trainer.demo.sweep [--out runs/demo] [--ratios 0.5 0.6 0.7 0.8 0.9] [--epochs E] [--procs 2]
                                 [--gates dynamicvit asvit]

Reuses OUT's demo data and teacher (`make demo` writes them; missing ones are built the same way first),
then trains one DynamicViT student per keep ratio rho and one AS-ViT student per FLOPs budget f = rho, each
with its demo recipe through launch.sh, evaluates each with the evaluate CLI and writes OUT/sweep/sweep.json,
sweep.md and sweep.png (val top-1 against MMACs per image, the dense teacher as the reference point).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence

from trainer.demo.pipeline import DemoError, evaluate_run, train_student, train_teacher

DEFAULT_RATIOS = (0.5, 0.6, 0.7, 0.8, 0.9)
# config keys each gate's point is set through. AS-ViT starts from thresholds calibrated to its budget:
# from the official fixed inits, one epoch at the official lr 2e-5 barely moves them, and every budget from
# 0.5 to 0.9 gave the same model (57% of the MACs saved, measured).
POINT_KEYS = {"dynamicvit": {"prune.keep_ratio": "{r}"},
              "asvit": {"prune.flops_budget": "{r}", "prune.calibrate_thresholds": "true"}}
GATES = tuple(POINT_KEYS)


def ensure_teacher(out: str, procs: int) -> tuple[str, str]:
    """(shards, teacher weights) of `make demo`, built first when missing."""
    from data.demo import build_demo

    shards = os.path.join(out, "data", "shards")
    if not os.path.isfile(os.path.join(shards, "_info.json")):
        build_demo(os.path.join(out, "data"), 2000, 200, workers=procs)
    teacher = os.path.join(out, "teacher.safetensors")
    if not os.path.isfile(teacher):
        teacher = train_teacher(out, shards, procs, 3)
    return shards, teacher


def run_sweep(out: str, ratios: Sequence[float] = DEFAULT_RATIOS, epochs: float = 1.0, procs: int = 2,
              gates: Sequence[str] = GATES) -> dict:
    """Train and evaluate every (gate, ratio) student; returns the sweep summary."""
    start = time.time()
    shards, teacher = ensure_teacher(out, procs)
    sweep_dir = os.path.join(out, "sweep")
    points: list[dict] = []
    for gate in gates:
        for ratio in ratios:
            name = f"{gate}_{ratio:g}"
            point = {key: value.format(r=ratio) for key, value in POINT_KEYS[gate].items()}
            run_dir = train_student(sweep_dir, name, gate, shards, teacher, procs, epochs,
                                    **point, **{"log.eval_every": 0})
            result = evaluate_run(run_dir, shards)
            points.append({"gate": gate, "ratio": ratio, "top1": result["student_top1"],
                           "mmacs": 1e3 * result["student_gmacs"], "dense_mmacs": 1e3 * result["dense_gmacs"],
                           "teacher_top1": result.get("teacher_top1")})
    teacher_eval = evaluate_run(os.path.join(out, "teacher"), shards)
    summary = {"points": points, "teacher": {"top1": teacher_eval["student_top1"],
                                             "mmacs": 1e3 * teacher_eval["student_gmacs"]},
               "epochs": epochs, "seconds": round(time.time() - start, 1)}
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_sweep(summary, os.path.join(sweep_dir, "sweep.png"))
    write_sweep_table(summary, os.path.join(sweep_dir, "sweep.md"))
    return summary


def plot_sweep(summary: dict, path: str) -> None:
    """Top-1 against MMACs per image, one line per gate, the teacher as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for gate, marker in (("dynamicvit", "o"), ("asvit", "s")):
        pts = sorted((p["mmacs"], p["top1"], p["ratio"]) for p in summary["points"] if p["gate"] == gate)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=gate)
        for x, y, ratio in pts:
            ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    t = summary["teacher"]
    ax.plot([t["mmacs"]], [t["top1"]], marker="*", markersize=14, linestyle="", label="dense teacher")
    ax.set(xlabel="MMACs per image", ylabel="val top-1 (%)",
           title=f"top-1 vs compute ({summary['epochs']:g} epoch(s) per student)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_table(summary: dict, path: str) -> None:
    """sweep.md: one row per student, the teacher first."""
    t = summary["teacher"]
    lines = ["| model | rho / f | MMACs | GMACs saved | top-1 | vs teacher |", "|---|---|---|---|---|---|",
             f"| teacher | - | {t['mmacs']:.1f} | - | {t['top1']:.2f} | - |"]
    for p in summary["points"]:
        lines.append(f"| {p['gate']} | {p['ratio']:g} | {p['mmacs']:.1f} | {1 - p['mmacs'] / t['mmacs']:.1%} | "
                     f"{p['top1']:.2f} | {p['top1'] - t['top1']:+.2f} |")
    lines += ["", "![top-1 vs MMACs](sweep.png)", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m trainer.demo.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="the demo folder (default runs/demo)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per student (default 1)")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--gates", nargs="+", default=list(GATES), choices=GATES)
    args = p.parse_args(argv)
    try:
        summary = run_sweep(os.path.abspath(args.out), args.ratios, args.epochs, args.procs, args.gates)
    except DemoError as e:
        sys.exit(f"demo-sweep: {e}")
    sweep = os.path.join(os.path.abspath(args.out), "sweep")
    print(f"\n=== sweep done in {summary['seconds'] / 60:.1f} min: {sweep}/sweep.md, {sweep}/sweep.png")


if __name__ == "__main__":
    main()
