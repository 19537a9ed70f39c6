"""Data streams: the global batch as ``S`` fixed streams, so the data position does not depend on hosts.

Stream ``v`` of ``S`` always produces rows ``[v*n, (v+1)*n)`` (``n = batch_size / S``) of every global
batch, from its own data shard ``v`` (files ``v, v+S, ...``; see ``sources.py``), whatever the host
count. A host whose devices hold rows ``[lo, hi)`` runs the streams that cover them: several when it
holds several, or, when hosts share a stream (``hi - lo < n``), each of them runs it and keeps its own
rows (correct and deterministic, at the cost of computing the whole stream).

The data position of a run is ``batches`` (global batches consumed, the same on every host) plus one
iterator snapshot per stream, saved by the stream's *owner*: the lowest process whose rows include
the stream's first row. On resume each host collects the snapshots of its streams from whichever
saved host files hold them (:func:`collect`), so a job checkpointed on 4 hosts continues on 2 (or 8)
with exactly the global batches of an uninterrupted run.

``data.streams = 0`` (auto) means: a fresh run takes one stream per row group of its layout (the most
efficient: one stream per host); the training loop then keeps the checkpoint's stream count on every
resume (:func:`resolve`), so resizing always works. A positive ``data.streams`` fixes the count.
This module has no TensorFlow import (cheap, unit-testable).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Sequence

import jax

log = logging.getLogger(__name__)

STATE_VERSION = 3
# what defines the streams: a saved position means nothing to a run where one of these differs
HEADER_KEYS = ("version", "split", "batch_size", "seq_len", "seed", "task", "streams")


@dataclasses.dataclass(frozen=True)
class HostStreams:
    """The streams of one host: rows ``[lo, hi)`` of a ``batch_size`` batch split into ``streams``."""

    batch_size: int
    streams: int
    lo: int
    hi: int
    owned: tuple[int, ...]  # streams whose snapshot this host saves

    def __post_init__(self):
        if self.streams < 1 or self.batch_size % self.streams:
            raise ValueError(f"batch_size={self.batch_size} is not divisible by data.streams={self.streams}: each "
                             f"stream produces an equal share of the rows. Fix: a data.streams that divides "
                             f"{self.batch_size} (or 0 = auto)")
        if not 0 <= self.lo < self.hi <= self.batch_size:
            raise ValueError(f"host rows [{self.lo}, {self.hi}) are not inside the batch of {self.batch_size}")

    @property
    def rows_per_stream(self) -> int:
        return self.batch_size // self.streams

    @property
    def indices(self) -> range:
        """The streams this host runs (their rows cover ``[lo, hi)``)."""
        n = self.rows_per_stream
        return range(self.lo // n, (self.hi - 1) // n + 1)

    @property
    def row_slice(self) -> slice:
        """This host's rows within the concatenated batches of its streams."""
        start = self.lo - self.indices.start * self.rows_per_stream
        return slice(start, start + self.hi - self.lo)

    @property
    def shared(self) -> bool:
        """True if this host computes rows it does not keep (hosts share a stream, or it holds part of one)."""
        return len(self.indices) * self.rows_per_stream != self.hi - self.lo

    def describe(self) -> str:
        first, last = self.indices[0], self.indices[-1]
        which = f"stream {first}" if first == last else f"streams {first}-{last}"
        return f"{which} of {self.streams}, rows [{self.lo}, {self.hi}) of {self.batch_size}"


def first_rows_owned(batch_size: int, streams: int, lo: int, hi: int) -> tuple[int, ...]:
    """The streams whose first row lies in ``[lo, hi)`` (the owner rule for one host standing alone)."""
    n = batch_size // streams
    return tuple(v for v in range(streams) if lo <= v * n < hi)


def owners(sharding: jax.sharding.Sharding, batch_size: int, streams: int) -> list[int]:
    """``owners[v]``: the lowest process whose devices hold the first row of stream ``v``."""
    n = batch_size // streams
    holders = [None] * streams
    for device, index in sharding.devices_indices_map((batch_size, 1)).items():
        start = index[0].start or 0
        stop = batch_size if index[0].stop is None else index[0].stop
        for v in range(streams):
            if start <= v * n < stop and (holders[v] is None or device.process_index < holders[v]):
                holders[v] = device.process_index
    return holders


def stream_count(cfg, row_groups: int) -> int:
    """``data.streams``, with 0 (auto) meaning one stream per row group of this layout."""
    value = int(cfg.data.get("streams", 0))
    return value if value > 0 else row_groups


def resolve(cfg, saved_cfg: dict | None, row_groups: int) -> tuple[int, str]:
    """The stream count a training run uses, and why: an explicit ``data.streams``; with auto, the
    checkpoint's (a resume on any host count continues the same streams) or one per row group."""
    value = int(cfg.data.get("streams", 0))
    if value > 0:
        return value, "data.streams"
    saved = int(((saved_cfg or {}).get("data") or {}).get("streams") or 0)
    if saved > 0 and int(cfg.batch_size) % saved == 0:
        return saved, "the checkpoint's data.streams (auto keeps it on resume)"
    if saved > 0:  # batch_size changed: the saved position cannot continue (set_state says so on every host)
        return row_groups, f"auto: the checkpoint's {saved} streams do not divide batch_size={cfg.batch_size}"
    return row_groups, "auto: one per row group of this layout"


def upgrade(state: dict) -> dict:
    """A version-2 state (one per row group, before streams) as a version-3 state of its one stream."""
    if state.get("version") != 2:
        return state
    out = {k: state.get(k) for k in HEADER_KEYS}
    out.update(version=STATE_VERSION, streams=state.get("process_count"), batches=state.get("batches"),
               stream_states={str(state.get("process_index")): state.get("snapshot")})
    return out


def collect(mine: dict, needed: Sequence[int], candidates: Iterable) -> tuple[dict | None, str | None]:
    """Search saved host states for the snapshots of the ``needed`` streams.

    ``mine`` is this pipeline's own header (``HEADER_KEYS``); ``candidates`` yields saved states or
    zero-argument callables that read one (files are read lazily, one at a time, and only until
    every needed stream is found). Returns ``({"batches": b, "streams": {v: snapshot or None}}, None)``
    or ``(None, why)``. A saved position at batch 0 fits any stream count (nothing was consumed).
    """
    found: dict[int, dict | None] = {}
    batches = None
    for candidate in candidates:
        state = candidate() if callable(candidate) else candidate
        if state is None:
            continue
        state = upgrade(state)
        fresh = state.get("batches") == 0
        for key in HEADER_KEYS:
            if key == "streams" and fresh:
                continue
            if state.get(key) != mine[key]:
                return None, f"data iterator state has {key}={state.get(key)!r} but this run has {mine[key]!r}"
        if fresh:
            return {"batches": 0, "streams": {}}, None
        if batches is None:
            batches = int(state["batches"])
        elif int(state["batches"]) != batches:
            return None, (f"saved host states disagree on the data position ({batches} and {state['batches']} "
                          "batches): the checkpoint's data item is inconsistent")
        for key, snap in (state.get("stream_states") or {}).items():
            if int(key) in needed and int(key) not in found:
                found[int(key)] = snap
        if all(v in found for v in needed):
            return {"batches": batches, "streams": found}, None
    missing = [v for v in needed if v not in found]
    if batches is None:
        return None, "no saved data-iterator state could be read"
    return None, (f"no saved state of stream(s) {missing} in the checkpoint's data files (a host's file is "
                  "missing)")


def search_order(own: dict | None, others: Sequence[Callable[[], dict]] | Iterable, first_needed: int,
                 streams: int) -> list:
    """``own`` first, then the other saved states starting at the one most likely to hold
    ``first_needed`` (the owner of stream v on P hosts in row order is process ``v * P // S``)."""
    others = list(others)
    if others and streams:
        guess = min(len(others) - 1, first_needed * len(others) // streams)
        others = others[guess:] + others[:guess]
    return [own, *others]


def shared_stream_note(layout: HostStreams, split: str) -> str | None:
    """A log line when this host computes rows it does not keep (more hosts than streams)."""
    if not layout.shared:
        return None
    computed = len(layout.indices) * layout.rows_per_stream
    return (f"data {split}: this host runs {layout.describe()} and keeps {layout.hi - layout.lo} of the "
            f"{computed} rows it computes (more hosts than data.streams={layout.streams}; correct, but "
            f"{computed // (layout.hi - layout.lo)}x the input work). A new run with data.streams = a multiple "
            f"of the host count avoids it")
