"""Static-shape inference graphs of a pruned student, for ONNX Runtime, TensorRT and torch.export.

    graph = StaticPrunedViT(student, deploy_keep_counts(student, 224))
    export_onnx(graph, example_images, "model.onnx", metadata={"mean": "[0.485, 0.456, 0.406]"})
    export_program(graph, example_images, "model.pt2", metadata=...)

The eval forward already gathers the kept tokens away; what a runtime needs besides is that every shape is
fixed except the batch: each gate keeps the same number of tokens for every image. DynamicViT's eval rule
(int(N rho^(s+1))) is static already. AS-ViT's is not (tokens above a learned threshold), so its exported
graph keeps a fixed count per stage, measured on calibration images (`deploy_keep_counts`), ranked by the
same AS-ViT score. The onnx/onnxruntime packages are imported only here and only when used (the `deploy`
extra).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from model.student import PrunedViT

DEPLOY_EXTRA = 'pip install -e ".[deploy]"  (onnx, onnxscript, onnxruntime)'
DEFAULT_OPSET = 20  # what torch's dynamo exporter targets; ONNX Runtime 1.17+ runs it


def require(module: str) -> Any:
    """Import an optional deploy package, or fail with the install line."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is missing ({e}); ONNX export and ONNX Runtime need the deploy extra: "
                          f"{DEPLOY_EXTRA}") from e


class StaticPrunedViT(nn.Module):
    """A student's eval forward with fixed per-stage keep counts: logits, and optionally the kept indices.

    `with_indices` adds the kept original patch indices of every stage as outputs ([B, k_s] int64): what a
    parity check compares before the logits, since a near-tie in the scores can flip a token.
    """

    def __init__(self, student: PrunedViT, keep_counts: Sequence[int], with_indices: bool = False) -> None:
        super().__init__()
        if len(keep_counts) != len(student.locations):
            raise ValueError(f"need {len(student.locations)} keep counts (one per gate), got {list(keep_counts)}")
        self.student = student
        self.keep_counts = [int(k) for k in keep_counts]
        self.with_indices = with_indices

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        logits, indices = self.student.pruned_forward(images, self.keep_counts)
        return (logits, *indices) if self.with_indices else logits


@torch.no_grad()
def deploy_keep_counts(student: PrunedViT, img_size: int, calibration_images: torch.Tensor | None = None,
                       chunk: int = 32) -> list[int]:
    """Tokens each gate keeps in the exported graph.

    DynamicViT: its eval counts int(N rho^(s+1)). AS-ViT: stage by stage, the mean over the calibration
    images of the tokens above the stage's threshold, the earlier stages keeping the counts already fixed
    (what the eval rule gives for all the images as one batch): the thresholds' average budget, the same
    count for every image. `chunk` images per forward bound the memory (577-token attention at 384 px).
    """
    if student.gate_type != "asvit":
        return student.eval_keep_counts(img_size) if student.locations else []
    if calibration_images is None or calibration_images.shape[0] == 0:
        raise ValueError("an AS-ViT export fixes each stage's keep count from calibration images: give some "
                         "(trainer.export reads the run's data.val, or --calibration-data), or the counts themselves")
    was_training = student.training
    student.eval()
    counts: list[int] = []
    try:
        for stage, gate in enumerate(student.gates):
            above = 0.0
            for part in calibration_images.split(chunk):
                student.pruned_forward(part, [*counts, *[None] * (len(student.gates) - stage)])
                above += float(gate.last_above.sum())
            entering = counts[-1] if counts else student.patches_at(img_size)
            mean = torch.tensor(above / calibration_images.shape[0])
            counts.append(max(1, min(entering, int(torch.round(mean)))))  # ThresholdGate.keep_count's rounding
    finally:
        student.train(was_training)
    return counts


def check_keep_counts(student: PrunedViT, img_size: int, keep_counts: Sequence[int]) -> None:
    """Counts a graph can keep: one per gate, each >= 1, never more than the stage before (nor the patches)."""
    patches = student.patches_at(img_size)
    counts = list(keep_counts)
    if len(counts) != len(student.locations):
        raise ValueError(f"keep counts {counts}: need {len(student.locations)} (one per gate)")
    if any(b > a for a, b in zip([patches, *counts], counts, strict=False)) or min(counts, default=1) < 1:
        raise ValueError(f"keep counts {counts}: each must be >= 1 and at most the previous stage's "
                         f"({patches} patches at {img_size} px)")


def _batch_dim() -> dict[str, dict[int, Any]]:
    return {"images": {0: torch.export.Dim("batch", min=1, max=65536)}}


class _Named(nn.Module):
    """Names the graph input `images` (export takes the forward's argument name)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> Any:
        return self.inner(images)


def _example(images: torch.Tensor) -> torch.Tensor:
    # Batch 2, not 1: an example batch of 1 would let the exporter specialise the batch axis to 1.
    return images[:1].expand(2, *images.shape[1:]).contiguous() if images.shape[0] < 2 else images[:2]


def export_onnx(model: nn.Module, images: torch.Tensor, path: str, opset: int = DEFAULT_OPSET,
                metadata: dict[str, str] | None = None) -> None:
    """Write `model` (eval mode, fp32) as ONNX with a dynamic batch axis; `metadata` goes in metadata_props."""
    require("onnx")
    require("onnxscript")  # torch's dynamo exporter translates through it
    model = _Named(model).eval()
    with torch.no_grad():
        program = torch.onnx.export(model, (_example(images),), dynamic_shapes=_batch_dim(), opset_version=opset,
                                    input_names=["images"], output_names=_output_names(model), dynamo=True,
                                    verbose=False)
    program.model.metadata_props.update(metadata or {})
    program.save(path)


def _output_names(model: _Named) -> list[str]:
    inner = model.inner
    if isinstance(inner, StaticPrunedViT) and inner.with_indices:
        return ["logits", *(f"kept_indices_{s}" for s in range(len(inner.keep_counts)))]
    return ["logits"]


def export_program(model: nn.Module, images: torch.Tensor, path: str, metadata: dict[str, str] | None = None) -> None:
    """Write `model` as a torch.export program (.pt2) with a dynamic batch axis; metadata as prunevit.json."""
    with torch.no_grad():
        program = torch.export.export(_Named(model).eval(), (_example(images),), dynamic_shapes=_batch_dim())
    torch.export.save(program, path, extra_files={"prunevit.json": json.dumps(metadata or {})})


def load_program_metadata(path: str) -> dict[str, str]:
    """The metadata export_program stored beside a .pt2 program."""
    extra = {"prunevit.json": ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra["prunevit.json"] or "{}")


def onnx_session(path: str, threads: int = 0) -> Any:
    """An ONNX Runtime CPU session (threads 0: the runtime's default, one per core)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_attention_tokens(path: str) -> list[int]:
    """The tokens each attention softmax of the ONNX graph works on, in graph order (one per block).

    Read from the graph's shapes, not from running it: the proof that a stage really runs on fewer tokens
    (a masked dense graph would give the same logits).
    """
    onnx = require("onnx")
    graph = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False)).graph
    shapes = {}
    for value in [*graph.value_info, *graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    tokens = []
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        shape = shapes.get(node.input[0], [])
        # Scores [B, heads, queries, keys]: every token is a query of its block's attention. (Shape inference
        # may leave the key axis symbolic after the exporter's reshapes; AS-ViT's CLS-row softmax has 1 query.)
        if len(shape) == 4 and isinstance(shape[-2], int) and shape[-2] > 1:
            tokens.append(shape[-2])
    return tokens


def expected_attention_tokens(student: PrunedViT, img_size: int, keep_counts: Sequence[int]) -> list[int]:
    """What onnx_attention_tokens should read for a graph of `student` keeping `keep_counts`."""
    prefix = student.vit.num_prefix_tokens
    live = student.patches_at(img_size)
    tokens = []
    for block in range(len(student.vit.blocks)):
        if block in student.locations:
            live = keep_counts[student.locations.index(block)]
        tokens.append(prefix + live)
    return tokens
