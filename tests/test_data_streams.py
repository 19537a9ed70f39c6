"""The data position does not depend on the host count (one process stands in for every host).

The global batch is ``data.streams`` fixed streams. Hosts save the snapshots of the streams they own;
a resume on another host count finds each stream's snapshot in whatever saved host file holds it and
continues with exactly the global batches of an uninterrupted run: 4 -> 2 hosts (a host runs two
streams), 2 -> 4 (hosts share a stream and keep half of its rows), 1 -> 8 (eight hosts take one row
each of the single stream). Changed stream-defining settings are refused (or restart) with the fix.
"""
import json
import logging

import numpy as np
import pytest

from glmjax.data import streams, testing
from glmjax.data.pipeline import make_pipeline

STEPS, MORE = 3, 2  # batches before the checkpoint, batches compared after it


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streams")
    testing.write_corpus(str(tmp / "docs"), 16, seed=11)
    c = testing.data_config(f"text:{tmp}/docs/*.txt", cache_dir=str(tmp / "cache"), batch_size=8, seq_len=64)
    c.data.snapshot_every = 2  # the resume goes through snapshots (at batch 2) and recomputes batch 3
    return c


def _with_streams(cfg, count):
    c = cfg.copy_and_resolve_references()
    c.data.streams = count
    return c


_RUNS = {}


def _run(cfg, count, hosts):
    """``hosts`` hosts of an uninterrupted run over ``count`` streams: every host's saved state after
    STEPS batches (JSON round trip, as on disk) and the global batches after it (the hosts' rows)."""
    key = (count, hosts)
    if key not in _RUNS:
        c = _with_streams(cfg, count)
        saved, rows = [], []
        for h in range(hosts):
            pipe = make_pipeline(c, "train", process_index=h, process_count=hosts)
            for _ in range(STEPS):
                next(pipe)
            saved.append(json.loads(json.dumps(pipe.get_state())))
            rows.append([next(pipe)["tokens"] for _ in range(MORE)])
            pipe.close()
        _RUNS[key] = saved, [np.concatenate([r[i] for r in rows]) for i in range(MORE)]
    return _RUNS[key]


def _resume(cfg, saved, hosts):
    """The global batches after the checkpoint, assembled from ``hosts`` resumed hosts."""
    rows = []
    for h in range(hosts):
        pipe = make_pipeline(cfg, "train", process_index=h, process_count=hosts)
        own = saved[h] if h < len(saved) else None
        pipe.set_state(own, others=[lambda s=s: s for s in saved])
        rows.append([next(pipe)["tokens"] for _ in range(MORE)])
        pipe.close()
    return [np.concatenate([r[i] for r in rows]) for i in range(MORE)]


@pytest.mark.parametrize("streams_, old, new", [(4, 4, 2), (2, 2, 4), (1, 1, 8)])
def test_resume_on_another_host_count_continues_batch_for_batch(cfg, streams_, old, new):
    c = _with_streams(cfg, streams_)
    saved, want = _run(cfg, streams_, old)  # the uninterrupted run's global batches after STEPS
    # each stream is saved once, by its owner (the lowest host holding its first row)
    owned = [sorted(map(int, s["stream_states"])) for s in saved]
    assert sorted(sum(owned, [])) == list(range(streams_)), owned
    assert all(s["batches"] == STEPS for s in saved)
    assert all(snap["batches"] == 2 for s in saved for snap in s["stream_states"].values())
    got = _resume(c, saved, new)
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x, y)


def test_the_global_batches_do_not_depend_on_the_host_count(cfg):
    """One host running both streams yields the rows two hosts of one stream each yield."""
    _, want = _run(cfg, 2, 2)
    pipe = make_pipeline(_with_streams(cfg, 2), "train", process_index=0, process_count=1)
    got = [next(pipe)["tokens"] for _ in range(STEPS + MORE)][STEPS:]
    pipe.close()
    for x, y in zip(want, got):
        np.testing.assert_array_equal(x, y)


def test_stream_layout_of_hosts():
    lay = streams.HostStreams(16, 4, 8, 16, (2, 3))  # 2 hosts of 8 rows over 4 streams of 4 rows
    assert list(lay.indices) == [2, 3] and lay.row_slice == slice(0, 8) and not lay.shared
    lay = streams.HostStreams(16, 2, 12, 16, ())  # 4 hosts over 2 streams: host 3 keeps half of stream 1
    assert list(lay.indices) == [1] and lay.row_slice == slice(4, 8) and lay.shared
    assert "2x the input work" in streams.shared_stream_note(lay, "train")
    lay = streams.HostStreams(12, 6, 3, 6, ())  # 2 rows per stream, 3 per host: half of stream 1, all of 2
    assert list(lay.indices) == [1, 2] and lay.row_slice == slice(1, 4)
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by data.streams=5"):
        streams.HostStreams(12, 5, 0, 12, ())
    assert streams.first_rows_owned(16, 4, 4, 12) == (1, 2)


def test_changed_stream_settings_are_refused_with_the_fix_or_restart(cfg, caplog):
    c = _with_streams(cfg, 2)
    saved, _ = _run(cfg, 2, 2)
    pipe = make_pipeline(_with_streams(cfg, 4), "train", process_index=0, process_count=2)
    with pytest.raises(ValueError, match="streams=2 but this run has 4.*data.streams=0 keeps the checkpoint's"
                                         ".*on_reshard=restart"):
        pipe.set_state(saved[0], others=saved)
    pipe.close()
    other_seed = _with_streams(cfg, 2)
    other_seed.seed = 5
    pipe = make_pipeline(other_seed, "train", process_index=0, process_count=2)
    with pytest.raises(ValueError, match="seed=0 but this run has 5"):
        pipe.set_state(saved[0], others=saved)
    pipe.close()
    # a missing host file: the stream it owned cannot be found -> refused, or restart with a warning
    pipe = make_pipeline(c, "train", process_index=1, process_count=2)
    with pytest.raises(ValueError, match=r"no saved state of stream\(s\) \[1\]"):
        pipe.set_state(None, others=saved[:1])
    c.data.on_reshard = "restart"
    with caplog.at_level(logging.WARNING):
        pipe.set_state(None, others=saved[:1])
    assert "starts the train data from its beginning" in caplog.text
    fresh = make_pipeline(c, "train", process_index=1, process_count=2)
    np.testing.assert_array_equal(next(pipe)["tokens"], next(fresh)["tokens"])
    pipe.close()
    fresh.close()


def test_a_state_saved_before_streams_continues_as_its_one_stream(cfg):
    """A version-2 state (one per row group) is the state of stream g of n."""
    c = _with_streams(cfg, 2)
    saved, _ = _run(cfg, 2, 2)
    v2 = {k: saved[1][k] for k in ("split", "batches", "seed", "task", "batch_size", "seq_len")}
    v2.update(version=2, process_index=1, process_count=2, snapshot=saved[1]["stream_states"]["1"])
    want = make_pipeline(c, "train", process_index=1, process_count=2)
    want.set_state(saved[1])
    got = make_pipeline(c, "train", process_index=1, process_count=2)
    got.set_state(v2)
    np.testing.assert_array_equal(next(want)["tokens"], next(got)["tokens"])
    want.close()
    got.close()


def test_auto_keeps_the_checkpoint_stream_count():
    from ml_collections import ConfigDict

    c = ConfigDict({"data": {"streams": 0}, "batch_size": 8})
    assert streams.resolve(c, None, 4)[0] == 4  # fresh: one per row group
    assert streams.resolve(c, {"data": {"streams": 4}}, 2)[0] == 4  # resumed on 2 hosts: keeps 4
    assert streams.resolve(c, {"data": {}}, 2)[0] == 2  # a checkpoint from before streams
    assert streams.resolve(c, {"data": {"streams": 3}}, 2)[0] == 2  # batch_size changed: set_state refuses
    c.data.streams = 8
    assert streams.resolve(c, {"data": {"streams": 4}}, 2) == (8, "data.streams")
