"""How long a checkpoint save blocks the training loop: async vs synchronous, and restore time.

    python tools/bench_checkpoint.py                    # tiny and ~100M-parameter GLM, 3 repeats
    python tools/bench_checkpoint.py --models tiny --repeats 5 --json /tmp/ckpt.json

For each model the real train state (parameters + AdamW moments, float32, sharded over all devices) is
saved through :class:`glmjax.checkpoint.Checkpointer`:

* ``async blocked``: time until ``save()`` returns with ``checkpoint.async_save=true`` -- what the loop
  waits for (device-to-host copy, fingerprints); the write itself runs in the background.
* ``async commit``: time from ``save()`` to the step being committed on disk (background).
* ``sync save``: the same state saved with ``checkpoint.async_save=false`` (blocks for the whole write).
* ``ratio`` = async blocked / sync save (target <= 0.1).
* ``restore``: ``Checkpointer.restore`` of the newest step into the same shardings (read + verify the
  fingerprints); ``unverified``: the same with ``checkpoint.verify=false``.

The first save of each mode (compilation of the fingerprint reduction, orbax start-up) is reported
separately and not counted in the medians.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny": [],
    "100m": ["--config.model.num_layers=12", "--config.model.hidden_size=768", "--config.model.num_heads=12",
             "--config.model.num_kv_heads=12", "--config.model.head_dim=64", "--config.model.mlp_dim=2048",
             "--config.model.vocab_size=8192"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--models", default="tiny,100m", help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--repeats", type=int, default=3, help="timed saves per mode (after one warm-up save)")
    p.add_argument("--dir", default=None, help="where to write checkpoints (default: a temporary directory)")
    p.add_argument("--json", default="bench_checkpoint.json", help="write the results here")
    return p.parse_args(argv)


def build_state(name):
    import jax

    from glmjax.config import load_config
    from glmjax.scaling.flops import param_count
    from glmjax.sharding import make_mesh
    from glmjax.train.state import init_state, model_spec

    cfg = load_config(str(ROOT / "configs" / "tiny.py"), MODELS[name])
    mesh = make_mesh(cfg)
    spec = model_spec(cfg, mesh)
    state = jax.block_until_ready(init_state(cfg, spec))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return cfg, spec, state, param_count(cfg.model)[0], nbytes


def time_saves(cfg, state, workdir: Path, async_save: bool, repeats: int):
    """(first save, [timed saves], [commit times]): seconds blocked in save(), seconds until committed."""
    import jax

    from glmjax.checkpoint import Checkpointer

    cfg = cfg.copy_and_resolve_references()
    cfg.checkpoint.every, cfg.checkpoint.keep = 1, 2
    cfg.checkpoint.async_save = async_save
    ckpt = Checkpointer(str(workdir), cfg, restart=False)
    blocked, commit = [], []
    for i in range(repeats + 1):
        step = i + 1
        state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        ckpt.save(step, state, {"batches": step})
        t1 = time.perf_counter()
        ckpt.wait()
        blocked.append(t1 - t0)
        commit.append(time.perf_counter() - t0)
    ckpt.close()
    return blocked[0], blocked[1:], commit[1:]


def time_restore(cfg, spec, workdir: Path, repeats: int, verify: bool):
    import jax

    from glmjax.checkpoint import Checkpointer

    cfg = cfg.copy_and_resolve_references()
    cfg.checkpoint.verify = verify
    times = []
    for _ in range(repeats):
        ckpt = Checkpointer(str(workdir), cfg)
        t0 = time.perf_counter()
        state, _, _ = ckpt.restore(spec.abstract_state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
        ckpt.close()
    return times


def main(argv=None):
    args = parse_args(argv)
    import jax

    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    machine = f"{platform.machine()} {jax.devices()[0].device_kind}, {jax.device_count()} device(s)"
    results = {"machine": machine, "jax": jax.__version__, "repeats": args.repeats, "models": []}
    for name in args.models.split(","):
        print(f"[{name}] building the train state ...", flush=True)
        cfg, spec, state, params, nbytes = build_state(name)
        row = {"model": name, "params": params, "state_bytes": nbytes}
        for mode in ("async", "sync"):
            workdir = base / f"{name}_{mode}"
            print(f"[{name}] {mode} saves ...", flush=True)
            first, blocked, commit = time_saves(cfg, state, workdir, mode == "async", args.repeats)
            row[f"{mode}_first_blocked_s"] = first
            row[f"{mode}_blocked_s"] = statistics.median(blocked)
            row[f"{mode}_commit_s"] = statistics.median(commit)
        print(f"[{name}] restores ...", flush=True)
        for verify in (True, False):
            times = time_restore(cfg, spec, base / f"{name}_sync", args.repeats, verify)
            row["restore_s" if verify else "restore_unverified_s"] = statistics.median(times)
        row["ratio"] = row["async_blocked_s"] / row["sync_blocked_s"]
        results["models"].append(row)
        shutil.rmtree(base / f"{name}_async", ignore_errors=True)
        shutil.rmtree(base / f"{name}_sync", ignore_errors=True)
        del state

    header = (f"{'model':>6} {'params':>8} {'state':>9} {'async blocked':>14} {'async commit':>13} "
              f"{'sync save':>10} {'ratio':>6} {'restore':>8} {'unverified':>10}")
    print(f"\nmachine: {machine}; medians of {args.repeats} saves after a warm-up\n{header}")
    for r in results["models"]:
        print(f"{r['model']:>6} {r['params'] / 1e6:>7.1f}M {r['state_bytes'] / 2**20:>7.0f}MiB "
              f"{r['async_blocked_s']:>13.3f}s {r['async_commit_s']:>12.3f}s {r['sync_blocked_s']:>9.3f}s "
              f"{r['ratio']:>6.3f} {r['restore_s']:>7.3f}s {r['restore_unverified_s']:>9.3f}s")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
