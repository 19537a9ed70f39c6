"""The input pipeline the training loop consumes: per-host batches, deterministic and resumable.

``make_pipeline(cfg, "train")`` gives an endless iterator of the rows of each global batch that this
process's devices hold, shuffled by ``cfg.seed``; ``"validation"`` is unshuffled and repeats, so a
fresh validation pipeline always yields the same batches. ``to_global`` assembles the hosts' rows into
global ``jax.Array``s of shape ``(batch_size, seq_len)``.

Streams (``streams.py``): the global batch is made of ``data.streams`` fixed streams; stream ``v``
always produces the same rows of every global batch from its own data shard, whatever the host
count. A process runs the streams covering the rows its devices hold (:func:`host_rows`), so
processes whose devices hold the same rows (a tensor or fsdp group spanning hosts) feed identical rows.

Determinism and resumption: the batches are a pure function of (config, split, stream count). Every
``data.snapshot_every`` batches the prefetch thread snapshots the tf.data iterators of the streams
this host owns (shuffle buffers, file positions, packer state; ``snapshot.py``). ``get_state()``
returns the number of global batches consumed plus those snapshots; ``set_state()`` finds the
snapshot of each of its streams in whichever host's saved state holds it, restores it and
recomputes only the batches after it (fewer than ``snapshot_every`` + the prefetch depth).

A daemon thread (``prefetch.py``) keeps ``data.prefetch`` batches ready; ``wait_seconds`` is the time
``__next__`` spent blocked on it (the step waiting for input).
"""
from __future__ import annotations

import logging
import time

import jax
import numpy as np
import seqio
import tensorflow as tf

from glmjax.data import snapshot, streams as streams_lib, tasks
from glmjax.data.features import MODEL_FEATURES, GLMFeatureConverter
from glmjax.data.global_batch import host_rows, row_group, to_global
from glmjax.data.prefetch import Prefetcher
from glmjax.data.streams import STATE_VERSION as _STATE_VERSION, HostStreams
from glmjax.data.vocab import get_vocabulary

log = logging.getLogger(__name__)

try:  # the input pipeline must never take GPU memory from JAX
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing to do
    pass


def build_dataset(cfg, split: str, stream: int, streams: int) -> tf.data.Dataset:
    """The tf.data pipeline of stream ``stream`` of ``streams`` (dict of ``[batch_size / streams,
    seq_len]`` arrays): data shard ``stream`` of ``streams``.

    Prefer ``make_pipeline``: it runs the iterators in a thread that is stopped at interpreter exit.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    if cfg.batch_size % streams:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {streams} data streams: each "
                         f"stream feeds an equal share. Fix: a batch_size that is a multiple of {streams}.")
    voc = get_vocabulary(cfg)
    name = tasks.register(cfg, voc)
    lengths = {k: int(cfg.seq_len) for k in tasks.FEATURES}
    provider = seqio.get_mixture_or_task(name)
    ds = provider.get_dataset(
        sequence_length=lengths, split=split, shuffle=(split == "train"), seed=int(cfg.seed),
        shard_info=seqio.ShardInfo(stream, streams), num_epochs=None)
    ds = GLMFeatureConverter(pack=bool(cfg.data.pack))(ds, lengths)
    ds = ds.batch(cfg.batch_size // streams, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


class Pipeline:
    """Iterator of this host's batches (its rows of each global batch); see the module docstring."""

    def __init__(self, cfg, split: str, layout: HostStreams):
        self.cfg, self.split, self.layout = cfg, split, layout
        self.local_batch_size = layout.hi - layout.lo
        self.wait_seconds = 0.0  # time __next__ spent blocked on the prefetch queue
        self._consumed = 0
        self._prefetcher: Prefetcher | None = None
        # built now (a bad path fails here), iterated once the position is known: start() / set_state()
        self._fresh = {v: build_dataset(cfg, split, v, layout.streams) for v in layout.indices}

    def _dataset(self, v: int):
        """Stream ``v``'s dataset, never iterated (a second iterator of one would reshuffle differently)."""
        ds = self._fresh.pop(v, None)
        return ds if ds is not None else build_dataset(self.cfg, self.split, v, self.layout.streams)

    def start(self) -> None:
        """Begin producing from the start of the data (in the background); ``next`` does it if needed."""
        if self._prefetcher is None:
            self._start(0, {})

    def _start(self, consumed: int, snaps: dict):
        """Stands every stream at batch ``consumed``, from its snapshot ``snaps[v]`` where there is one."""
        if self._prefetcher is not None:
            self._prefetcher.close()
        iterators, starts, start_snaps = [], [], []
        for v in self.layout.indices:
            snap = snaps.get(v)
            start = int(snap["batches"]) if snap else 0
            if not 0 <= start <= consumed:
                raise ValueError(f"data iterator state: stream {v}'s snapshot at batch {start} is after the "
                                 f"position {consumed}")
            iterator = iter(self._dataset(v))
            if snap:
                try:
                    snapshot.restore(iterator, snap["iterator"])
                except Exception as e:  # noqa: BLE001 - e.g. the pipeline's code changed since the save
                    log.warning("data iterator snapshot of stream %d at batch %d does not fit this pipeline (%s); "
                                "recomputing the %d batches from the start instead", v, start, e, consumed)
                    # a fresh dataset: a second iterator of the same one would reshuffle differently
                    iterator = iter(self._dataset(v))
                    start, snap = 0, None
            iterators.append(iterator)
            starts.append(start)
            start_snaps.append(snap["iterator"] if snap else None)
        self._prefetcher = Prefetcher(
            iterators, int(self.cfg.data.prefetch), position=consumed, starts=starts, start_snapshots=start_snaps,
            owned=[v in self.layout.owned for v in self.layout.indices], rows=self.layout.row_slice,
            snapshot_every=int(self.cfg.data.snapshot_every))
        self._consumed = consumed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self.start()
        t0 = time.perf_counter()
        batch = self._prefetcher.get()
        self.wait_seconds += time.perf_counter() - t0
        self._consumed += 1
        return batch

    @property
    def batches_consumed(self) -> int:
        return self._consumed

    def _header(self) -> dict:
        return dict(version=_STATE_VERSION, split=self.split, batch_size=int(self.cfg.batch_size),
                    seq_len=int(self.cfg.seq_len), seed=int(self.cfg.seed), task=str(self.cfg.data.task),
                    streams=self.layout.streams)

    def get_state(self) -> dict:
        """JSON-serialisable data position: global batches consumed, and the latest snapshot (at or
        before it) of each stream this host owns (``stream_states``: {stream: snapshot or None})."""
        state = dict(self._header(), batches=self._consumed, rows=[self.layout.lo, self.layout.hi], stream_states={})
        for k, v in enumerate(self.layout.indices):
            if v not in self.layout.owned:
                continue
            position, snap = self._prefetcher.latest_snapshot(k, self._consumed) if self._prefetcher else (0, None)
            state["stream_states"][str(v)] = {"batches": position, "iterator": snap} if snap is not None else None
        return state

    def set_state(self, state: dict | None, others=()) -> None:
        """Continues with exactly the batches the uninterrupted iterator would give after ``state``.

        ``state`` is this host's own saved state (None if the run had no host of this index);
        ``others`` every host's saved state (dicts or zero-argument callables reading one, in process
        order), searched lazily for the snapshots of this host's streams, so a resume on more or
        fewer hosts continues exactly. With several processes this is collective: every host calls it
        and all take one decision. If some host cannot continue (a stream-defining setting changed,
        a file is missing), every host raises the same error, or with ``data.on_reshard="restart"``
        every host starts the data over (logged; repeats data).
        """
        mine = self._header()
        order = streams_lib.search_order(state, others, self.layout.indices[0], self.layout.streams)
        found, problem = streams_lib.collect(mine, list(self.layout.indices), order)
        if _all_processes(problem is None):
            self._start(found["batches"], found["streams"])
            log.info("data %s: resumed at global batch %d (%s)", self.split, found["batches"], self.layout.describe())
            return
        problem = problem or "another host cannot continue its data streams (see its log)"
        if str(self.cfg.data.get("on_reshard", "error")) == "restart":
            log.warning("%s: every host starts the %s data from its beginning (data.on_reshard=restart); "
                        "batches seen before the checkpoint are seen again", problem, self.split)
            self._start(0, {})
            return
        raise ValueError(
            f"{problem}: the saved data position cannot be continued. Fix: resume with the checkpoint's "
            "batch_size, seq_len, seed, data.task and data.streams (data.streams=0 keeps the checkpoint's); "
            "or pass --config.data.on_reshard=restart to start the data over on every host (repeats data).")

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


def host_streams(cfg, *, process_index: int | None = None, process_count: int | None = None,
                 sharding: jax.sharding.Sharding | None = None) -> HostStreams:
    """The streams this host runs (see :func:`make_pipeline` for the arguments)."""
    batch_size = int(cfg.batch_size)
    if process_index is None and process_count is None:
        if sharding is None and jax.process_count() > 1:
            from glmjax.sharding import batch_sharding, make_mesh

            sharding = batch_sharding(make_mesh(cfg))
        if sharding is None:
            lo, hi = 0, batch_size
        else:
            lo, hi = host_rows(sharding, batch_size)
        count = streams_lib.stream_count(cfg, batch_size // (hi - lo))
        owned = (tuple(v for v, p in enumerate(streams_lib.owners(sharding, batch_size, count))
                       if p == jax.process_index()) if sharding is not None and batch_size % count == 0 else None)
    elif process_index is None or process_count is None:
        raise ValueError("pass both process_index and process_count (the row group), or neither")
    else:
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
        if batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} row groups: each "
                             f"group feeds an equal share. Fix: a batch_size that is a multiple of {process_count}.")
        lo, hi = process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count
        count, owned = streams_lib.stream_count(cfg, process_count), None
    if owned is None:
        owned = streams_lib.first_rows_owned(batch_size, count, lo, hi) if batch_size % count == 0 else ()
    return HostStreams(batch_size, count, lo, hi, owned)


def make_pipeline(cfg, split: str, *, process_index: int | None = None, process_count: int | None = None,
                  sharding: jax.sharding.Sharding | None = None) -> Pipeline:
    """This host's batch iterator for ``split`` ('train' or 'validation').

    ``process_index`` / ``process_count`` name the host's rows as row group ``i`` of ``n`` (tests,
    tools); by default they come from ``sharding`` (default: ``batch_sharding(make_mesh(cfg))``) with
    several processes, and are all rows with one. The streams are ``data.streams`` (0 = one per row group).
    """
    layout = host_streams(cfg, process_index=process_index, process_count=process_count, sharding=sharding)
    log.info("data %s: %s (process %d of %d)", split, layout.describe(), jax.process_index(), jax.process_count())
    note = streams_lib.shared_stream_note(layout, split)
    if note:
        log.info(note)
    return Pipeline(cfg, split, layout)


__all__ = ["MODEL_FEATURES", "Pipeline", "build_dataset", "host_rows", "host_streams", "make_pipeline", "row_group",
           "to_global"]
