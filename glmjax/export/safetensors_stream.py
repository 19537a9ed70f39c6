"""Safetensors shards written tensor by tensor: host memory holds one tensor, never a whole shard.

A safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw tensors. Shapes and dtypes are known before any tensor is read, so shards
are planned first (greedily, each at most ``max_shard_bytes`` unless one tensor is larger), each
header is written, then each tensor is produced, converted and appended. The index
``model.safetensors.index.json`` maps every tensor to its shard, as ``from_pretrained`` expects.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np

DTYPES = {"float32": ("F32", np.float32, 4), "bfloat16": ("BF16", None, 2), "float16": ("F16", np.float16, 2)}


def parse_size(text) -> int:
    """``5GB``, ``500MB``, ``1.5GiB``, ``1000`` -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"--max_shard_size={text!r} is not a size: write e.g. 5GB, 500MB or 2000000")
    unit = (m.group(2) or "").upper().replace("B", "")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    base = 1024 if unit.endswith("I") else 1000
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise ValueError(f"--max_shard_size={text!r} must be > 0")
    return size


def _convert(array: np.ndarray, dtype: str) -> bytes:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.ascontiguousarray(array.astype(ml_dtypes.bfloat16)).tobytes()
    return np.ascontiguousarray(array.astype(DTYPES[dtype][1])).tobytes()


def plan_shards(tensors, dtype: str, max_shard_bytes: int) -> list[list]:
    """Greedy grouping of ``(name, shape, make)`` into shards of at most ``max_shard_bytes``."""
    width = DTYPES[dtype][2]
    shards, current, size = [], [], 0
    for t in tensors:
        nbytes = math.prod(t[1]) * width
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(t)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def write_shards(tensors, out_dir: str, *, dtype: str = "float32", max_shard_size="5GB", progress=None,
                 metadata: dict | None = None) -> dict:
    """Write ``tensors`` (``(name, shape, make)``) as safetensors shards + index into ``out_dir``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    code, _, width = DTYPES[dtype]
    shards = plan_shards(tensors, dtype, parse_size(max_shard_size))
    n = len(shards)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards, start=1):
        fname = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, shape, _ in shard:
            nbytes = math.prod(shape) * width
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, make in shard:
                array = make()
                if tuple(array.shape) != tuple(shape):
                    raise AssertionError(f"{name}: mapped shape {array.shape} != planned {shape}")
                f.write(_convert(array, dtype))
                del array
                weight_map[name] = fname
                if progress is not None:
                    progress(name)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return {"shards": n, "bytes": total}
