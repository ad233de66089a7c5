"""One gated training step under torch.profiler: which attention kernels ran, and the peak memory.

    python benchmarks/profile_step.py --arch deit_base_patch16_384 --img-size 384 --batch-sizes 32 64 \
        --device cuda --dtype bf16 [--attention bias fold]

Prints one JSON line (benchmarks/gpu.sh keeps it as profile.json). For each masked-attention
implementation asked for (default: the student's own), at the first batch size, after warm-up steps:

- `attention_ops`: the aten SDPA / attention ops the step called, with counts. They name the kernel
  family SDPA dispatched to: `_scaled_dot_product_flash_attention`, `..._efficient_attention`,
  `..._cudnn_attention`, `..._attention_math` (or, for the explicit-softmax path, no SDPA op at all);
- `attention_kernels`: the device kernels whose names look like attention (flash, fmha/cutlass,
  cudnn sdpa, flex/triton templates, softmax), with calls and microseconds;
- `backends`: the families seen (flash, mem_efficient, cudnn, math, flex), and `no_sdpa_in_K_of_N_blocks`
  when K blocks called no SDPA op (the explicit-softmax reference, or a custom path like `chunked`);
- `top_kernels`: the step's most expensive device kernels (CPU ops on a CPU).

And for every batch size: `torch.cuda.max_memory_allocated` over one gated and one dense (gate none)
training step (model weights and gradients included), in GiB. CUDA only; on a CPU the memory fields
are null and only the op names are real.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, run from anywhere
from model.student import PrunedViT, create_student

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ATTENTION_KERNEL = re.compile(r"flash|fmha|attention|attn|sdpa|cutlass.*(mha|attn)|flex|softmax|triton_tem", re.I)
FAMILIES = (  # (family, pattern on aten op names or kernel names)
    ("flash", re.compile(r"flash", re.I)),
    ("cudnn", re.compile(r"cudnn.*(attention|sdpa|fmha|mha)|(attention|sdpa|fmha).*cudnn", re.I)),
    ("mem_efficient", re.compile(r"efficient_attention|fmha_cutlass|cutlass.*fmha|mem_eff", re.I)),
    ("math", re.compile(r"_scaled_dot_product_attention_math", re.I)),
    ("flex", re.compile(r"flex_attention|triton_tem_fused", re.I)),
)


def train_step(model: PrunedViT, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> None:
    """Forward + backward as model.bench times it (cross-entropy plus a stand-in for the gate losses)."""
    with torch.autocast(images.device.type, dtype=_DTYPES[dtype], enabled=dtype != "fp32"):
        out = model(images)
        loss = F.cross_entropy(out.logits.float(), labels)
        if out.keep_masks:
            loss = loss + sum((m.float().mean() - 0.5) ** 2 for m in out.keep_masks)
    loss.backward()
    model.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_device_event(evt: Any) -> bool:
    kind = getattr(evt, "device_type", None)
    return kind is not None and kind != torch.autograd.DeviceType.CPU


def profile_step(model: PrunedViT, images: torch.Tensor, labels: torch.Tensor, dtype: str, top: int) -> dict:
    """Kernel and op names of one training step (run after warm-up)."""
    device = images.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, images, labels, dtype)
        _sync(device)
    ops: dict[str, int] = defaultdict(int)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if _is_device_event(evt):
            entry = kernels[evt.name]
            entry[0] += 1
            entry[1] += evt.time_range.elapsed_us()
        elif evt.name.startswith("aten::") and re.search(r"attention|sdpa|softmax|flash", evt.name):
            ops[evt.name] += 1
    if device.type != "cuda":  # no device kernels: the CPU ops stand in for them
        for evt in prof.key_averages():
            kernels[evt.key] = [evt.count, evt.self_cpu_time_total]
    total_us = sum(us for _, us in kernels.values()) or 1.0
    attn = {name: v for name, v in kernels.items() if ATTENTION_KERNEL.search(name)}
    names = list(ops) + list(attn)
    backends = sorted({fam for fam, pat in FAMILIES for n in names if pat.search(n)})
    # Blocks whose attention called no SDPA/flex op ran another path (the explicit fp32 softmax, or a
    # custom autograd function such as the chunked one): timm's blocks call SDPA once per forward.
    blocks = len(model.vit.blocks)
    sdpa_calls = ops.get("aten::scaled_dot_product_attention", 0)
    flex = any("flex" in n for n in names)
    if sdpa_calls < blocks and not flex:
        backends.append(f"no_sdpa_in_{blocks - sdpa_calls}_of_{blocks}_blocks")
    row = lambda name, v: {"name": name[:240], "calls": int(v[0]), "us": round(v[1], 1)}  # noqa: E731
    by_time = lambda d: sorted(d.items(), key=lambda kv: -kv[1][1])  # noqa: E731
    return {
        "attention_ops": dict(sorted(ops.items())),
        "blocks": blocks,
        "sdpa_calls": sdpa_calls,
        "backends": backends,
        "attention_kernels": [row(n, v) for n, v in by_time(attn)],
        "attention_time_fraction": round(sum(v[1] for v in attn.values()) / total_us, 4),
        "device_time_us": round(total_us, 1),
        "top_kernels": [row(n, v) for n, v in by_time(kernels)[:top]],
    }


def peak_memory(model: PrunedViT, images: torch.Tensor, labels: torch.Tensor, dtype: str) -> float | None:
    """GiB: max allocated over one training step (warm model: weights resident, gradients freed after)."""
    device = images.device
    if device.type != "cuda":
        return None
    train_step(model, images, labels, dtype)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    train_step(model, images, labels, dtype)
    _sync(device)
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="deit_base_patch16_384")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--gate", default="dynamicvit", choices=["dynamicvit", "asvit"])
    parser.add_argument("--keep-ratio", type=float, default=0.7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--attention", nargs="*", default=[], help="implementations (default: the student's own)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    def student(attention: str | None) -> PrunedViT:
        extra = {"attention": attention} if attention else {}
        return create_student(args.arch, args.gate, args.keep_ratio, img_size=args.img_size, **extra).train().to(device)

    result: dict[str, Any] = {"bench": "profile", "arch": args.arch, "gate": args.gate, "keep_ratio": args.keep_ratio,
                              "dtype": args.dtype, "profiled_batch_size": args.batch_sizes[0], "attention": {}}
    if device.type == "cuda":
        result["device"] = torch.cuda.get_device_name(device)
        result["sdp_enabled"] = {k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
                                 for k in ("flash", "mem_efficient", "cudnn", "math")}
    gated = None
    for attention in args.attention or [None]:
        gated = None  # free the previous implementation's student first
        gated = student(attention)
        size = gated.vit.patch_embed.img_size
        images = torch.randn(args.batch_sizes[0], 3, *size, device=device)
        labels = torch.randint(0, gated.vit.num_classes, (args.batch_sizes[0],), device=device)
        for _ in range(args.warmup):
            train_step(gated, images, labels, args.dtype)
        _sync(device)
        name = attention or getattr(gated, "attention", "default")
        result["attention"][name] = profile_step(gated, images, labels, args.dtype, args.top)
        print(f"profiled attention={name}: backends {result['attention'][name]['backends']}", file=sys.stderr)
    assert gated is not None
    # Peak memory of one step, one model resident at a time (the last implementation's gated student,
    # then a dense copy of it): weights, activations and gradients of that model alone.
    memory: dict[str, dict[str, float | None]] = {str(b): {} for b in args.batch_sizes}
    size, classes = gated.vit.patch_embed.img_size, gated.vit.num_classes
    dense_vit = copy.deepcopy(gated.vit).cpu()
    for key in ("gated", "dense"):
        model = gated if key == "gated" else PrunedViT(dense_vit, gate="none").train().to(device)
        gated = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for batch in args.batch_sizes:
            images = torch.randn(batch, 3, *size, device=device)
            labels = torch.randint(0, classes, (batch,), device=device)
            memory[str(batch)][f"{key}_gib"] = peak_memory(model, images, labels, args.dtype)
        del model, images, labels
    result["peak_memory"] = memory
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
