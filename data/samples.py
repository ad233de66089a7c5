"""Decoding one raw tar sample, and the kinds of bad sample we skip and count.

Only the two fields we use are ever read: image bytes (`jpg`, `jpeg`, `png`, `webp`) and the integer
label (`cls`). webdataset's default decoders would also unpickle `.pyd`/`.pickle` fields; untrusted
shards must never reach them, so `WANTED_FIELDS` is applied while the tar is read and nothing else is
even extracted.
"""

from __future__ import annotations

import io

from PIL import Image

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELD = "cls"
WANTED_FIELDS = frozenset(IMAGE_FIELDS + (LABEL_FIELD,))

# Every reason a sample can be skipped; each is counted separately so a dashboard says *what* is wrong.
SKIP_KINDS = (
    "missing_image",       # no image field in the sample
    "bad_image",           # image bytes that PIL cannot identify or decode (corrupt)
    "truncated_image",     # image bytes that end early (a cut-off download or copy)
    "missing_label",       # no `cls` field
    "bad_label",           # `cls` is not an integer
    "label_out_of_range",  # `cls` outside [0, num_classes)
    "bad_tar",             # a tar that breaks while being read (truncated or damaged; the rest of it is lost)
    "empty_shard",         # a shard with no samples at all (an empty file or an empty tar)
    "missing_shard",       # a shard that cannot be opened (deleted or unmounted after the run started)
    "unreachable_shard",   # a remote shard that still failed after data.net_retries (drops, 404/5xx, stalls)
)
# Sample-level kinds count samples; the last four count shard reads (each time a worker opens the shard).
SHARD_KINDS = ("bad_tar", "empty_shard", "missing_shard", "unreachable_shard")


class SampleError(Exception):
    """A sample that cannot be used; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def wanted_member(fname: str) -> bool:
    """tar member filter: keep only the fields we decode (see the module docstring)."""
    ext = fname.rsplit("/", 1)[-1].split(".", 1)[-1].lower() if "." in fname else ""
    return ext in WANTED_FIELDS


def decode_label(sample: dict, num_classes: int | None) -> int:
    """The integer class of a raw sample, or SampleError."""
    raw = sample.get(LABEL_FIELD)
    if raw is None:
        raise SampleError("missing_label", f"sample {sample.get('__key__')!r} has no '{LABEL_FIELD}' field")
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, bytes) else raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_label", f"sample {sample.get('__key__')!r}: cls={raw[:20]!r} is not an int") from e
    if num_classes is not None and not 0 <= label < num_classes:
        raise SampleError("label_out_of_range",
                          f"sample {sample.get('__key__')!r}: cls={label} outside [0, {num_classes})")
    return label


def decode_image(sample: dict) -> Image.Image:
    """The RGB image of a raw sample (PNG or CMYK bytes in a `.jpg` field are valid), or SampleError."""
    data = next((sample[k] for k in IMAGE_FIELDS if k in sample), None)
    if data is None:
        raise SampleError("missing_image", f"sample {sample.get('__key__')!r} has no image field")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes; only "truncated" is worth telling apart
        kind = "truncated_image" if isinstance(e, OSError) and "truncated" in str(e).lower() else "bad_image"
        raise SampleError(kind, f"sample {sample.get('__key__')!r}: {type(e).__name__}: {e}") from e


def decode_sample(sample: dict, num_classes: int | None) -> tuple[Image.Image, int]:
    """(RGB image, label) of a raw sample; the label is checked first because it is cheap."""
    label = decode_label(sample, num_classes)
    return decode_image(sample), label
