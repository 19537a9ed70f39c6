"""Benchmark: decode tokens/s with the KV cache vs full recomputation, batch 1 and 8.

    python tools/bench_inference.py                       # small GLM-4-style model, CPU-friendly
    python tools/bench_inference.py --hidden=1024 --layers=12 --new_tokens=128   # on an accelerator

Random parameters (the speed does not depend on their values). Each configuration is run once to
compile, then timed; tokens/s counts new tokens of all rows (batch * new_tokens / seconds). Not a test.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--dry_run", action="store_true", help="tiny sizes, to check the tool")
    args = p.parse_args(argv)
    if args.dry_run:
        args.hidden, args.layers, args.prompt_len, args.new_tokens, args.batches = 64, 1, 8, 4, "1"
    import jax
    import numpy as np
    from flax import nnx

    from glmjax.config import base_config
    from glmjax.inference import from_params, generate_ids
    from glmjax.model.glm import GLM, pure_dict

    cfg = base_config()
    m = cfg.model
    m.hidden_size, m.num_layers, m.vocab_size = args.hidden, args.layers, args.vocab
    m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = max(args.hidden // 64, 1), max(args.hidden // 128, 1), 64, 3 * args.hidden
    model = from_params(cfg, jax.tree.map(np.asarray, pure_dict(nnx.state(GLM(m, nnx.Rngs(0)), nnx.Param))))
    print(f"device {jax.devices()[0].device_kind}; model hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens")
    rng = np.random.default_rng(0)
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [rng.integers(8, args.vocab, args.prompt_len).tolist() for _ in range(b)]
        rates = {}
        for cache in (True, False):
            generate_ids(model, prompts, max_new_tokens=args.new_tokens, use_cache=cache)  # compile
            t0 = time.perf_counter()
            generate_ids(model, prompts, max_new_tokens=args.new_tokens, use_cache=cache)
            rates[cache] = b * args.new_tokens / (time.perf_counter() - t0)
        print(f"batch {b}: KV cache {rates[True]:,.0f} tokens/s, recompute {rates[False]:,.0f} tokens/s "
              f"({rates[True] / rates[False]:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
