"""tf.data iterator snapshots as JSON-serialisable dicts (so a restore need not recompute the stream).

A snapshot is the iterator's tf.data checkpoint (shuffle buffers, file positions, packer state) with
each checkpoint file zlib-compressed and base64-encoded: ``{"files": {name: base64}}``. Restoring one into an iterator of
the same pipeline (same config, any process) continues exactly where the snapshot was taken.
"""
from __future__ import annotations

import base64
import os
import tempfile
import zlib

import tensorflow as tf

_PREFIX = "iterator"


def save(iterator) -> dict:
    """The state of ``iterator`` (a tf.data iterator) as a JSON-serialisable dict."""
    with tempfile.TemporaryDirectory(prefix="glmjax-data-") as d:
        tf.train.Checkpoint(iterator=iterator).write(os.path.join(d, _PREFIX))
        files = {}
        for name in sorted(os.listdir(d)):
            with open(os.path.join(d, name), "rb") as f:
                files[name] = base64.b64encode(zlib.compress(f.read(), 1)).decode("ascii")
    return {"files": files}


def restore(iterator, snapshot: dict) -> None:
    """Puts ``iterator`` (fresh, same pipeline) in the state ``snapshot`` recorded."""
    with tempfile.TemporaryDirectory(prefix="glmjax-data-") as d:
        for name, data in snapshot["files"].items():
            if os.path.basename(name) != name:
                raise ValueError(f"bad file name {name!r} in a data iterator snapshot")
            with open(os.path.join(d, name), "wb") as f:
                f.write(zlib.decompress(base64.b64decode(data)))
        tf.train.Checkpoint(iterator=iterator).read(os.path.join(d, _PREFIX)).assert_consumed()


def size_bytes(snapshot: dict) -> int:
    """Encoded size of a snapshot (what it adds to a checkpoint's JSON)."""
    return sum(len(v) for v in snapshot["files"].values())
