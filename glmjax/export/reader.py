"""Read a glmjax checkpoint's parameters tensor by tensor, without loading the whole train state.

A checkpoint step is ``WORKDIR/checkpoints/<step>/{state,config}`` (see :mod:`glmjax.checkpoint`).
``state`` is an orbax OCDBT store of zarr arrays named by their tree path (``params.layers.attn.wq``).
:class:`CheckpointReader` opens one array at a time with tensorstore and can read a slice of it (one
layer of the stacked, scanned layers), so host memory holds one tensor, never the model; the optimizer
state is never read. Every error a user can cause (no workdir, no such step, a damaged step) is a
:class:`CheckpointReadError` saying what and how to fix it.
"""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import tensorstore as ts
from etils import epath

from glmjax.checkpoint import CHECKPOINT_DIR
from glmjax.checkpoint.run_files import step_dirs


class CheckpointReadError(ValueError):
    """The workdir / step cannot be read; the message says what is wrong and the fix."""


def _abs(workdir: str) -> str:
    return workdir if "://" in str(workdir) else os.path.abspath(os.path.expanduser(str(workdir)))


def find_step(workdir: str, step: int | None = None) -> tuple[int, epath.Path]:
    """(step, step directory): the newest committed step, or ``step``; raises with the fix if absent."""
    workdir = _abs(workdir)
    root = epath.Path(workdir)
    if not root.exists():
        raise CheckpointReadError(f"--workdir={workdir} does not exist: pass the directory a training run "
                                  f"wrote (python -m glmjax.train --workdir=DIR)")
    steps = step_dirs(root / CHECKPOINT_DIR)
    if not steps:
        raise CheckpointReadError(f"{workdir} has no checkpoints (nothing under {root / CHECKPOINT_DIR}): train "
                                  f"first, or pass the workdir of a run that saved one")
    if step is None:
        return steps[0]
    for s, path in steps:
        if s == int(step):
            return s, path
    raise CheckpointReadError(f"--step={step} is not a checkpoint of {workdir}: the saved steps are "
                              f"{sorted(s for s, _ in steps)}; pass one of them or omit --step for the newest")


def config_of(step_dir: epath.Path) -> ml_collections.ConfigDict:
    """The run config saved with the step, as a ConfigDict (model section complete for the model)."""
    path = step_dir / "config" / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"checkpoint {step_dir} has no readable config ({path}: {e}): the step is "
                                  f"damaged; pass another --step") from None
    return config_from_dict(saved)


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
    """``base_config()`` updated with a saved (JSON) config: keys it lacks keep their defaults."""
    from glmjax.config import base_config

    cfg = base_config()
    _merge(cfg, saved)
    return cfg


def _merge(cfg: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if key in cfg and isinstance(cfg[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _merge(cfg[key], value)
        else:
            with cfg.unlocked():
                cfg[key] = tuple(value) if isinstance(value, list) else value


class CheckpointReader:
    """Parameters of one checkpoint step, opened lazily one tensor at a time.

    ``names()``: the parameter paths (tuples such as ``('layers', 'attn', 'wq')``); ``shape(name)``;
    ``read(name, index=...)``: a NumPy array of the tensor or of ``tensor[index]``.
    """

    def __init__(self, workdir: str, step: int | None = None, *, block_bytes: int = 2 * 1024**3):
        self.block_bytes = int(block_bytes)
        self._block = (None, None, None)  # (name, first layer, array) of the cached layer block
        self.workdir = _abs(workdir)
        self.step, self.step_dir = find_step(self.workdir, step)
        self.cfg = config_of(self.step_dir)
        state = self.step_dir / "state"
        try:
            meta = json.loads((state / "_METADATA").read_text())["tree_metadata"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointReadError(f"checkpoint step {self.step} of {self.workdir} is damaged: its state "
                                      f"metadata {state / '_METADATA'} cannot be read ({e}); pass another --step")
        self._meta = {}
        for value in meta.values():
            keys = tuple(k["key"] for k in value["key_metadata"])
            if keys and keys[0] == "params":
                self._meta[keys[1:]] = tuple(value["value_metadata"].get("write_shape") or ())
        if not self._meta:
            raise CheckpointReadError(f"checkpoint step {self.step} of {self.workdir} has no parameters: not a "
                                      f"glmjax train state; pass the workdir of a glmjax run")
        self._base = str(state) if "://" in str(state) else "file://" + str(state)
        self._open = {}

    def names(self) -> list[tuple[str, ...]]:
        return sorted(self._meta)

    def shape(self, name: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self._array(name).shape)  # the metadata's write_shape is the shard shape

    def _array(self, name):
        name = tuple(name)
        if name not in self._open:
            key = ".".join(("params", *name))
            errors = []
            for driver in ("zarr", "zarr3"):
                spec = {"driver": driver, "kvstore": {"driver": "ocdbt", "base": self._base, "path": key + "/"},
                        # one chunk decoded at a time, nothing cached: memory ~ one chunk + the output
                        "context": {"cache_pool": {"total_bytes_limit": 0},
                                    "data_copy_concurrency": {"limit": 1}}}
                try:
                    self._open[name] = ts.open(spec, open=True, read=True).result()
                    break
                except Exception as e:  # noqa: BLE001 -- try the other zarr version, then report
                    errors.append(str(e).split(" [tensorstore_spec")[0])
            else:
                raise CheckpointReadError(f"checkpoint step {self.step} of {self.workdir}: parameter {key} cannot "
                                          f"be opened ({errors[-1]}); the step is damaged, pass another --step")
        return self._open[name]

    def read(self, name, index=None) -> np.ndarray:
        """``tensor`` or ``tensor[index]``. An int ``index`` (one layer of a stacked tensor) is served from
        the chunk-aligned block of layers holding it, kept until another block is read, when that block
        is a single chunk (which any read must decode whole anyway) or at most ``block_bytes``; so
        reading the layers of one tensor in order decodes each chunk once."""
        arr = self._array(name)
        if isinstance(index, (int, np.integer)) and arr.rank >= 1:
            c0 = int(arr.chunk_layout.read_chunk.shape[0] or 1)
            start = (int(index) // c0) * c0
            stop = min(start + c0, arr.shape[0])
            block_bytes = (stop - start) * int(np.prod(arr.shape[1:])) * arr.dtype.numpy_dtype.itemsize
            single_chunk = list(arr.chunk_layout.read_chunk.shape[1:]) == list(arr.shape[1:])
            if single_chunk or block_bytes <= self.block_bytes:
                if self._block[:2] != (tuple(name), start):
                    self._block = (None, None, None)
                    self._block = (tuple(name), start, self._read(name, arr, slice(start, stop)))
                return self._block[2][int(index) - start]
        return self._read(name, arr, index)

    def _read(self, name, arr, index) -> np.ndarray:
        try:
            view = arr if index is None else arr[index]
            out = np.asarray(view.read().result())
        except Exception as e:  # noqa: BLE001
            raise CheckpointReadError(f"checkpoint step {self.step} of {self.workdir}: parameter "
                                      f"{'.'.join(name)} cannot be read ({str(e).splitlines()[0][:300]}); the "
                                      f"step is damaged, pass another --step") from None
        if not np.all(np.isfinite(out)):
            raise CheckpointReadError(f"checkpoint step {self.step} of {self.workdir}: parameter "
                                      f"{'.'.join(name)} holds NaN/inf; pass an earlier --step")
        return out

    def read_tree(self) -> dict:
        """Every parameter as a nested dict of NumPy arrays (the model's pure dict)."""
        tree: dict = {}
        for name in self.names():
            node = tree
            for part in name[:-1]:
                node = node.setdefault(part, {})
            node[name[-1]] = self.read(name)
        return _int_keys(tree)


def _int_keys(tree):
    """nnx.List layers are saved under '0', '1', ...: give them back int keys as the pure dict has."""
    if not isinstance(tree, dict):
        return tree
    return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
