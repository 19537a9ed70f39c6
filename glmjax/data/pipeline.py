"""The input pipeline the training loop consumes: per-host batches, deterministic and resumable.

``make_pipeline(cfg, "train")`` gives an endless iterator of the rows of each global batch that this
process's devices hold, shuffled by ``cfg.seed``; ``"validation"`` is unshuffled and repeats, so a
fresh validation pipeline always yields the same batches. ``to_global`` assembles the hosts' rows into
global ``jax.Array``s of shape ``(batch_size, seq_len)``.

Row groups: the batch sharding (``sharding.batch_sharding``) splits the global batch into
``data * fsdp`` equal row slices; a process holds the slices of its devices (:func:`host_rows`), one
contiguous range ``[lo, hi)``. The data is sharded by *row group* (``lo // (hi - lo)`` of
``batch_size // (hi - lo)``), not by process: processes whose devices hold the same rows (a tensor or
fsdp group spanning hosts) build identical streams and feed identical rows.

Determinism and resumption: the batches are a pure function of (config, split, row group and
group count). Every ``data.snapshot_every`` batches the prefetch thread snapshots the tf.data iterator
(shuffle buffers, file positions, packer state; ``snapshot.py``). ``get_state()`` returns the number
of batches this host consumed plus the latest snapshot at or before it; ``set_state()`` rebuilds the
pipeline, restores the snapshot and recomputes only the batches after it (fewer than
``snapshot_every`` + the prefetch depth). Without a snapshot it recomputes from the start.

A daemon thread keeps ``data.prefetch`` batches ready; ``wait_seconds`` is the time ``__next__``
spent blocked on it (the step waiting for input).
"""
from __future__ import annotations

import atexit
import collections
import logging
import queue
import threading
import time
import weakref

import jax
import numpy as np
import seqio
import tensorflow as tf

from glmjax.data import snapshot, tasks
from glmjax.data.global_batch import host_rows, row_group, to_global
from glmjax.data.features import MODEL_FEATURES, GLMFeatureConverter
from glmjax.data.vocab import get_vocabulary

_STATE_VERSION = 2
log = logging.getLogger(__name__)

try:  # the input pipeline must never take GPU memory from JAX
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to do
    pass


def _local_batch_size(cfg, process_count: int) -> int:
    if cfg.batch_size % process_count:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by the {process_count} row groups: each group "
            f"feeds an equal share. Fix: a batch_size that is a multiple of {process_count}."
        )
    return cfg.batch_size // process_count


def build_dataset(cfg, split: str, process_index: int, process_count: int) -> tf.data.Dataset:
    """The tf.data pipeline of this host's batches (dict of ``[local_batch, seq_len]`` arrays).

    Prefer ``make_pipeline``: it runs the iterator in a thread that is stopped at interpreter exit.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    voc = get_vocabulary(cfg)
    name = tasks.register(cfg, voc)
    lengths = {k: int(cfg.seq_len) for k in tasks.FEATURES}
    provider = seqio.get_mixture_or_task(name)
    ds = provider.get_dataset(
        sequence_length=lengths, split=split, shuffle=(split == "train"), seed=int(cfg.seed),
        shard_info=seqio.ShardInfo(process_index, process_count), num_epochs=None)
    ds = GLMFeatureConverter(pack=bool(cfg.data.pack))(ds, lengths)
    ds = ds.batch(_local_batch_size(cfg, process_count), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


_LIVE: "weakref.WeakSet[_Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all():
    """Stop prefetch threads before interpreter shutdown (a tf.data iterator torn down mid-call can hang)."""
    for prefetcher in list(_LIVE):
        prefetcher.close()


class _Prefetcher:
    """A daemon thread that runs a tf.data iterator into a bounded queue of numpy batches.

    The iterator stands at batch ``start`` (``start_snapshot`` is the snapshot it was restored from,
    if any); the thread skips ``skip`` batches, then produces. Every ``snapshot_every`` batches it
    records ``(position, snapshot)`` taken exactly after batch ``position`` (the last few are kept).
    """

    _DONE = object()
    _KEEP = 4  # snapshots kept: the consumer lags the producer by at most the queue size

    def __init__(self, iterator, size: int, *, start: int = 0, start_snapshot=None, skip: int = 0,
                 snapshot_every: int = 0):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._snapshots = collections.deque([(start, start_snapshot)] if start_snapshot else [], maxlen=self._KEEP)
        self._every = snapshot_every
        args = (iterator, start, skip)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True, name="glmjax-prefetch")
        self._thread.start()
        _LIVE.add(self)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator, position, skip):
        try:
            for _ in range(skip):
                next(iterator)
            position += skip
            for batch in iterator:
                position += 1
                if not self._put({k: v.numpy() for k, v in batch.items()}):
                    return
                if self._every and position % self._every == 0:
                    snap = snapshot.save(iterator)
                    with self._lock:
                        self._snapshots.append((position, snap))
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)

    def latest_snapshot(self, at_most: int):
        """The newest ``(position, snapshot)`` with position <= ``at_most``, or ``(0, None)``."""
        with self._lock:
            found = [(p, s) for p, s in self._snapshots if p <= at_most]
        return found[-1] if found else (0, None)

    def get(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=10)


class Pipeline:
    """Iterator of this host's batches; see the module docstring."""

    def __init__(self, cfg, split: str, process_index: int, process_count: int):
        self.cfg, self.split = cfg, split
        self.process_index, self.process_count = process_index, process_count
        self.local_batch_size = _local_batch_size(cfg, process_count)
        self.wait_seconds = 0.0  # time __next__ spent blocked on the prefetch queue
        self._consumed = 0
        self._prefetcher: _Prefetcher | None = None
        self._start(0, None)

    def _start(self, consumed: int, snap: dict | None):
        if self._prefetcher is not None:
            self._prefetcher.close()
        start = int(snap["batches"]) if snap else 0
        if not 0 <= start <= consumed:
            raise ValueError(f"data iterator state: snapshot at batch {start} is after the position {consumed}")
        iterator = iter(build_dataset(self.cfg, self.split, self.process_index, self.process_count))
        if snap:
            try:
                snapshot.restore(iterator, snap["iterator"])
            except Exception as e:  # noqa: BLE001 - e.g. the pipeline's code changed since the save
                log.warning("data iterator snapshot at batch %d does not fit this pipeline (%s); recomputing "
                            "the %d batches from the start instead", start, e, consumed)
                # a fresh dataset: a second iterator of the same one would reshuffle differently
                iterator = iter(build_dataset(self.cfg, self.split, self.process_index, self.process_count))
                start, snap = 0, None
        self._prefetcher = _Prefetcher(iterator, int(self.cfg.data.prefetch), start=start, skip=consumed - start,
                                       start_snapshot=snap["iterator"] if snap else None,
                                       snapshot_every=int(self.cfg.data.snapshot_every))
        self._consumed = consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        batch = self._prefetcher.get()
        self.wait_seconds += time.perf_counter() - t0
        self._consumed += 1
        return batch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def get_state(self) -> dict:
        """JSON-serialisable position of this host's iterator (with the latest snapshot before it)."""
        state = dict(version=_STATE_VERSION, split=self.split, batches=self._consumed, seed=int(self.cfg.seed),
                     process_index=self.process_index, process_count=self.process_count,
                     task=str(self.cfg.data.task), batch_size=int(self.cfg.batch_size), seq_len=int(self.cfg.seq_len),
                     snapshot=None)
        if self._prefetcher is not None:
            position, snap = self._prefetcher.latest_snapshot(self._consumed)
            if snap is not None:
                state["snapshot"] = {"batches": position, "iterator": snap}
        return state

    _STREAM_KEYS = ("version", "split", "process_index", "process_count", "batch_size", "seq_len", "seed", "task")

    def _misfit(self, state: dict | None, mine: dict) -> str | None:
        """Why ``state`` is not a position in this pipeline's stream, or None if it is."""
        if state is None:
            return "no saved data-iterator state for this host (the host count changed)"
        for key in self._STREAM_KEYS:
            if state.get(key) != mine[key]:
                return f"data iterator state has {key}={state.get(key)!r} but this run has {mine[key]!r}"
        return None

    def set_state(self, state: dict | None, others=()) -> None:
        """Continues with exactly the batches the uninterrupted iterator would give after ``state``.

        Restores the state's iterator snapshot (if any) and recomputes only the batches after it.
        ``state=None`` means this host has no saved state (the host count changed). ``others`` (every
        host's saved state, lazily) is searched when ``state`` does not fit: a state saved for this
        host's row group by another process continues the same stream, so a resume on more or fewer
        hosts with the same row groups (e.g. a tensor or fsdp group that spanned hosts now within one)
        loses and repeats nothing. With several processes this is collective: every host calls it and
        all take one decision. If some host finds no fitting state, every host raises the same error,
        or with ``data.on_reshard="restart"`` every host starts the data over (logged; repeats data).
        """
        mine = self.get_state()
        problem = self._misfit(state, mine)
        if problem is not None:
            for other in others:
                if self._misfit(other, mine) is None:
                    log.info("data %s: %s; continuing from the state another host saved for row group %d of %d",
                             self.split, problem, self.process_index, self.process_count)
                    state, problem = other, None
                    break
        if _all_processes(problem is None):
            self._start(int(state["batches"]), state.get("snapshot"))
            return
        problem = problem or "another host's saved data-iterator state does not fit its row group (see its log)"
        if str(self.cfg.data.get("on_reshard", "error")) == "restart":
            log.warning("%s: every host starts the %s data from its beginning (data.on_reshard=restart); "
                        "batches seen before the checkpoint are seen again", problem, self.split)
            self._start(0, None)
            return
        raise ValueError(
            f"{problem}: no saved position fits this host's row group (the data is sharded by row group = "
            "the batch rows a host's devices hold; the host count or mesh.data/fsdp changed them). Fix: resume "
            "with the same mesh and host layout; or pass --config.data.on_reshard=restart to start the data "
            "over on every host (repeats data).")

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None


def _all_processes(flag: bool) -> bool:
    """True iff ``flag`` holds on every process (one answer all hosts agree on; collective)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).all())


def make_pipeline(cfg, split: str, *, process_index: int | None = None, process_count: int | None = None,
                  sharding: jax.sharding.Sharding | None = None) -> Pipeline:
    """This host's batch iterator for ``split`` ('train' or 'validation').

    ``process_index`` / ``process_count`` name the row group explicitly (tests, tools); by default it
    comes from ``sharding`` (default: ``batch_sharding(make_mesh(cfg))``) with several processes, and
    is ``(0, 1)`` with one.
    """
    if process_index is None and process_count is None:
        if sharding is None and jax.process_count() > 1:
            from glmjax.sharding import batch_sharding, make_mesh

            sharding = batch_sharding(make_mesh(cfg))
        process_index, process_count = row_group(sharding, int(cfg.batch_size)) if sharding is not None else (0, 1)
        log.info("data %s: row group %d of %d (process %d of %d)", split, process_index, process_count,
                 jax.process_index(), jax.process_count())
    elif process_index is None or process_count is None:
        raise ValueError("pass both process_index and process_count (the row group), or neither")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    return Pipeline(cfg, split, process_index, process_count)


__all__ = ["MODEL_FEATURES", "Pipeline", "build_dataset", "host_rows", "make_pipeline", "row_group", "to_global"]
