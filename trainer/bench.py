"""All benchmarks in one place; each prints one JSON line.

    python -m trainer.bench inference  --arch deit_small_patch16_224 --gate dynamicvit --keep-ratio 0.7 --batch-size 16
    python -m trainer.bench inference  --runtime onnxruntime --arch deit_small_patch16_224 --keep-ratio 0.7
    python -m trainer.bench train-step --arch deit_small_patch16_224 --gate dynamicvit --batch-size 16
    python -m trainer.bench data       --img-size 384 --workers 1 [--data IMAGEFOLDER]
    python -m trainer.bench data       --source http [--latency-ms 50] [--mb-per-s 20]
    python -m trainer.bench teacher-precision --config runs/demo/dynamicvit/config.yaml

inference: dense vs pruned eval img/s side by side, and the analytic GMACs ratio (the physical limit); with
           --runtime onnxruntime, both exported to ONNX and run by ONNX Runtime (batch 32 and batch-1 latency).
train-step: forward+backward of the dense and the gated student and the teacher forward, side by side;
            img/s of the distillation step, and MFU on GPUs with a known peak (H100, H200, A100).
data: decoded+augmented img/s per worker, our shard pipeline vs timm's ImageFolder loader; with --source http,
      the same loader over a slow loopback HTTP server vs local disk (data.bench_stream).
teacher-precision: KD and token targets of a bf16 teacher against an fp32 one (trainer.teacher_precision).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

BENCHES = ("inference", "train-step", "data", "teacher-precision")


def main(argv: Sequence[str] | None = None) -> None:
    """Dispatch to the benchmark named by the first argument."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in BENCHES:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if args[0] == "data" and any(a == "--source" or a.startswith("--source=") for a in args):
        from data.bench_stream import main as stream_main

        stream_main(args[1:])
    elif args[0] == "teacher-precision":
        from trainer.teacher_precision import main as precision_main

        precision_main(args[1:])
    elif args[0] == "data":
        from data.bench import main as data_main

        data_main(args[1:])
    else:
        from model.bench import main as model_main

        model_main(args)


if __name__ == "__main__":
    main()
