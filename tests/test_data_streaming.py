"""``text:`` files are streamed as documents of whole lines (a large shard never sits in memory), the
documents the pipeline reads are the file's text, and the iterator state stays under
the size measured for it (docs/data.md)."""
import json
import os
import subprocess
import sys

import numpy as np

from glmjax.data import sources, tasks, testing


def source_texts(pattern):
    src = tasks.FileSource(sources.parse_spec(f"text:{pattern}"), 0.05)
    return [t.decode() for t in src.get_dataset("train", shuffle=False).map(lambda ex: ex["text"]).as_numpy_iterator()]


def test_text_documents_are_runs_of_whole_lines(tmp_path):
    rng = np.random.default_rng(5)
    small = testing.random_text(rng, 30).rstrip("\n") + "\n"
    lines = [f"line {i} {rng.integers(1e9)}" for i in range(2 * sources.TEXT_PIECE_LINES + 7)]
    (tmp_path / "a_small.txt").write_text(small)
    (tmp_path / "b_big.txt").write_text("\n".join(lines))  # no final newline: the last line gets one
    got = source_texts(f"{tmp_path}/*.txt")
    n = sources.TEXT_PIECE_LINES
    want = [small] + ["".join(x + "\n" for x in lines[i:i + n]) for i in range(0, len(lines), n)]
    assert got == want
    assert list(sources.text_pieces(str(tmp_path / "b_big.txt"))) == want[1:]  # the tokenizer's reader


# Measured in a fresh interpreter per file: in the suite's process (or next to another pytest-xdist
# worker) earlier tests leave freed-but-kept heap that makes an in-process RSS difference meaningless.
_MEASURE = r"""
import json, os, resource, sys
from glmjax.data import testing
from glmjax.data.pipeline import make_pipeline
from glmjax.data.vocab import get_vocabulary
cache, path, batches = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = testing.data_config("stdlib", cache_dir=cache, seq_len=128)
cfg.data.snapshot_every = 10  # the state carries an iterator snapshot (shuffle buffer, file position)
cfg.data.task = f"text:{path}"
get_vocabulary(cfg)  # the tokenizer (built once, cached) is not part of what reading a file costs
rss0 = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
pipe = make_pipeline(cfg, "train", process_index=0, process_count=1)
for _ in range(batches):
    batch = next(pipe)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
state = pipe.get_state()
pipe.close()
print(json.dumps({"growth": peak - rss0, "filled": float((batch["segment_ids"] > 0).mean()),
                  "state_bytes": len(json.dumps(state)), "snapshot": state["stream_states"]["0"] is not None}))
"""


def _growth_reading(cache_dir, path, batches):
    """Peak RSS growth of building a pipeline over ``path`` and reading ``batches`` batches, in a fresh
    interpreter; with the size of the iterator state it would save."""
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(cache_dir), str(path), str(batches)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["filled"] > 0.9 and out["snapshot"], out
    return out


def write_shard(path, mb, block):
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        while f.tell() < mb * 2**20:
            f.write(block)
    return os.path.getsize(path)


def test_a_large_text_file_streams_with_bounded_memory_and_bounded_state(tmp_path):
    rng = np.random.default_rng(6)
    block = "".join(testing.random_text(rng, 40) for _ in range(200)).encode()
    write_shard(tmp_path / "small" / "shard.txt", 1, block)
    size = write_shard(tmp_path / "big" / "shard.txt", 200, block)
    cache = tmp_path / "cache"
    # the same pipeline over a 1 MB file: the fixed cost (TF graph, threads, buffers)
    fixed = _growth_reading(cache, tmp_path / "small" / "shard.txt", 20)["growth"]
    big = _growth_reading(cache, tmp_path / "big" / "shard.txt", 20)
    # read whole, the 200 MB file would cost >= 2x its size on top (the bytes + their decoded copy);
    # streamed, only the pipeline's buffers (1 MB read buffer, pieces of 4096 lines, 64 shuffled
    # examples) come on top: a bound of half the file's size separates the two by a factor of 4
    growth = big["growth"]
    assert growth < fixed + size / 2, (growth / 2**20, fixed / 2**20, size / 2**20)
    cfg = testing.data_config("stdlib", cache_dir=str(cache), seq_len=128)
    print(f"peak rss growth {growth / 2**20:.1f} MB (fixed {fixed / 2**20:.1f} MB) for {size / 2**20:.0f} MB; "
          f"state {big['state_bytes'] / 1e6:.2f} MB < {state_bound_bytes(cfg) / 1e6:.2f} MB")
    assert big["state_bytes"] < state_bound_bytes(cfg), (big["state_bytes"], state_bound_bytes(cfg))


def state_bound_bytes(cfg) -> int:
    """An empirical ceiling, not a derivation (docs/data.md): the snapshot holds the shuffled examples
    (shuffle_buffer x seq_len x 7 features) plus the documents and batches in flight (up to a few
    4096-line pieces); measured 2.3 MB here (seq_len 128, shuffle_buffer 64, batch 8). 4 MB flags growth."""
    assert (int(cfg.seq_len), int(cfg.data.shuffle_buffer), int(cfg.batch_size)) == (128, 64, 8)
    return 4_000_000
