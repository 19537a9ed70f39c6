"""Benchmark: export throughput (GB/s) and peak host RSS of tools/export_hf.py on a ~1B-parameter model.

    python tools/bench_export.py --workdir=/tmp/bench_export_1b            # create (once) + export
    python tools/bench_export.py --workdir=DIR --layers=2 --dry_run        # small, to check the tool

Creates (if absent) a random-init GLM-4-style checkpoint in the glmjax layout (parameters only, written
layer by layer with orbax, so creating it needs little memory either), then runs the real exporter in a
fresh process and reports its wall time, GB/s and peak RSS (``ru_maxrss`` of that process) against the
model's float32 size. Streaming means peak RSS stays well below the model size. Not a test; the
checkpoint is not part of the repository (delete it after).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MODEL = dict(num_layers=16, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=6144,
             vocab_size=32000, norm="rmsnorm_pre", mlp="swiglu", rope_2d=False, qkv_bias=True, tie_embeddings=False)


def create(workdir: str, layers: int, shards: int) -> int:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={shards}"
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from glmjax.checkpoint import config_to_dict
    from glmjax.config import base_config
    from glmjax.train.state import abstract_params

    cfg = base_config()
    for k, v in MODEL.items():
        cfg.model[k] = v
    cfg.model.num_layers = layers
    _, abstract, _ = abstract_params(cfg.model)
    rng = np.random.default_rng(0)
    # Saved sharded over the (fake) devices along each tensor's largest divisible dimension, as a
    # multi-device training run saves it: orbax writes one zarr chunk per shard.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))

    def place(s):
        x = 0.02 * rng.standard_normal(s.shape, dtype=np.float32)
        dims = [d for d in np.argsort(s.shape)[::-1] if s.shape[d] % len(jax.devices()) == 0]
        spec = [None] * len(s.shape)
        if dims:
            spec[dims[0]] = "x"
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
    params = jax.tree.map(place, abstract)
    n = sum(x.size for x in jax.tree.leaves(params))
    step_dir = os.path.join(workdir, "checkpoints", "0")
    os.makedirs(os.path.join(step_dir, "config"), exist_ok=True)
    with open(os.path.join(step_dir, "config", "config.json"), "w") as f:
        json.dump(config_to_dict(cfg), f)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(os.path.abspath(step_dir), "state"), {"step": np.int32(0), "params": params})
    ckptr.wait_until_finished()
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/bench_export_1b", help="where the benchmark checkpoint lives")
    p.add_argument("--out", default="", help="export directory (default WORKDIR.hf; deleted after)")
    p.add_argument("--layers", type=int, default=MODEL["num_layers"], help="layers (16: ~1.0B parameters)")
    p.add_argument("--max_shard_size", default="1GB")
    p.add_argument("--shards", type=int, default=8, help="devices the checkpoint is saved from (zarr chunks)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--dry_run", action="store_true", help="tiny sizes: check the tool works")
    p.add_argument("--tokenizer", default="", help="SentencePiece model to export with it (default: train one)")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.dry_run:
        MODEL.update(hidden_size=256, mlp_dim=512, vocab_size=4096, num_heads=4, num_kv_heads=2, head_dim=64)
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints", "0")):
        t0 = time.time()
        n = create(args.workdir, args.layers, args.shards)
        print(f"created {n / 1e9:.3f}B-parameter checkpoint in {args.workdir} ({time.time() - t0:.0f}s)")
    tok = args.tokenizer
    if not tok:
        from glmjax.data import sources
        from glmjax.data.vocab import train_tokenizer

        tok = train_tokenizer(sources.iter_texts(sources.parse_spec("stdlib"), "train"), 1024,
                              os.path.join(args.workdir, "sp.model"), 200_000)
    out = args.out or args.workdir.rstrip("/") + ".hf"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_hf.py"),
           f"--workdir={args.workdir}", f"--out={out}", f"--max_shard_size={args.max_shard_size}",
           f"--dtype={args.dtype}", f"--tokenizer={tok}"]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode:
        print(r.stderr[-3000:])
        return r.returncode
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    from glmjax.export.reader import CheckpointReader

    reader = CheckpointReader(args.workdir)
    n = sum(int(__import__("math").prod(reader.shape(k))) for k in reader.names())
    line = r.stdout.strip().splitlines()[0]
    print(line)
    print(f"params {n / 1e9:.3f}B, float32 size {4 * n / 1e9:.2f} GB, written {size / 1e9:.2f} GB, "
          f"wall {wall:.1f}s (process incl. imports) -> {size / 1e9 / wall:.2f} GB/s; peak RSS {rss / 1e9:.2f} GB "
          f"= {rss / (4 * n):.2f}x the float32 model")
    shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
