"""The prefetch thread of the input pipeline: runs a host's stream iterators into a bounded queue.

Each global batch, the thread takes one batch from every stream the host runs, concatenates them
and keeps the host's rows. Every ``snapshot_every`` batches it snapshots the streams this host owns
(``snapshot.py``), off the training step's path. A daemon thread, stopped at interpreter exit (a
tf.data iterator torn down mid-call can hang).
"""
from __future__ import annotations

import atexit
import collections
import queue
import threading
import weakref

import numpy as np

from glmjax.data import snapshot

_LIVE: "weakref.WeakSet[Prefetcher]" = weakref.WeakSet()


@atexit.register
def _close_all():
    for prefetcher in list(_LIVE):
        prefetcher.close()


class Prefetcher:
    """Runs ``iterators`` (one per stream, in row order) into a queue of numpy batches (rows ``rows``).

    Iterator ``k`` stands at batch ``starts[k]`` and skips to ``position`` first (recomputing the
    batches after its snapshot). ``owned`` marks the iterators whose snapshots are recorded: every
    ``snapshot_every`` batches, ``(position, snapshot)`` taken exactly after batch ``position``
    (the last few are kept; ``start_snapshots[k]``, if any, is the one iterator k was restored from).
    """

    _DONE = object()
    _KEEP = 4  # snapshots kept per stream: the consumer lags the producer by at most the queue size

    def __init__(self, iterators, size: int, *, position: int, starts, start_snapshots, owned, rows: slice,
                 snapshot_every: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._owned = list(owned)
        self._snapshots = [collections.deque([(s, snap)] if snap is not None else [], maxlen=self._KEEP)
                           for s, snap in zip(starts, start_snapshots)]
        self._every = snapshot_every
        self._rows = rows
        args = (list(iterators), position, list(starts))
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

    def _combine(self, parts) -> dict[str, np.ndarray]:
        if len(parts) == 1:
            out = {k: v.numpy() for k, v in parts[0].items()}
        else:
            out = {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}
        n = next(iter(out.values())).shape[0]
        if self._rows != slice(0, n):
            out = {k: v[self._rows] for k, v in out.items()}
        return out

    def _run(self, iterators, position, starts):
        try:
            for it, start in zip(iterators, starts):
                for _ in range(position - start):
                    next(it)
            while True:
                try:
                    parts = [next(it) for it in iterators]
                except StopIteration:
                    break
                position += 1
                if not self._put(self._combine(parts)):
                    return
                if self._every and position % self._every == 0:
                    for k, it in enumerate(iterators):
                        if self._owned[k]:
                            snap = snapshot.save(it)
                            with self._lock:
                                self._snapshots[k].append((position, snap))
            self._put(self._DONE)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._put(e)

    def latest_snapshot(self, k: int, at_most: int):
        """Iterator ``k``'s newest ``(position, snapshot)`` with position <= ``at_most``, or ``(0, None)``."""
        with self._lock:
            found = [(p, s) for p, s in self._snapshots[k] if p <= at_most]
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
