"""Benchmark GLM-mask attention implementations: forward and forward+backward TFLOP/s.

Two FLOP counts are reported per run: ``visible`` counts only the query-key pairs the mask lets
through (the work a perfect block-sparse kernel must do); ``dense`` counts all T*T pairs. Forward is
4*H*D FLOPs per pair (two matmuls); forward+backward is 3.5x forward (backward = 5 matmuls).

Masks: ``causal`` (one document per row) and ``glm`` (packed rows: several documents per row, each
with a bidirectional Part A prefix; a little trailing padding). cuDNN runs causal natively and the
GLM mask as a dense bias (``cudnn_dense``).

Examples:
    # the issue's GPU sweep (B*T = 16k tokens, T = 1k..16k, D = 128, bf16):
    python tools/bench_attention.py --out bench_attention.json
    # a CPU smoke run (interpret-mode Pallas; numbers meaningless for speed):
    python tools/bench_attention.py --tokens 512 --seq_lens 256,512 --num_heads 2 \\
        --impls pallas_gpu,xla --interpret --iters 1 --out /tmp/bench_cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--impls", default="pallas_gpu,cudnn,xla",
                   help="comma list of implementations (pallas_gpu, pallas_tpu, cudnn, xla)")
    p.add_argument("--masks", default="causal,glm", help="comma list: causal, glm")
    p.add_argument("--modes", default="fwd,fwd_bwd", help="comma list: fwd, fwd_bwd")
    p.add_argument("--tokens", type=int, default=16384, help="batch * seq_len per run")
    p.add_argument("--seq_lens", default="1024,2048,4096,8192,16384", help="comma list of T")
    p.add_argument("--num_heads", type=int, default=16)
    p.add_argument("--num_kv_heads", type=int, default=None, help="default: num_heads (MHA)")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--docs_per_row", type=int, default=4, help="GLM mask: documents per row")
    p.add_argument("--block_q", type=int, default=None)
    p.add_argument("--block_k", type=int, default=None)
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--interpret", action="store_true",
                   help="run Pallas kernels in interpret mode (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    return p.parse_args(argv)


def glm_masks(rng, batch, length, docs_per_row):
    """Packed rows: ``docs_per_row`` documents of random length, each with a random Part A."""
    seg = np.zeros((batch, length), np.int32)
    bid = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = length - int(rng.integers(0, max(length // 32, 1)))
        cuts = np.sort(rng.choice(np.arange(1, used), docs_per_row - 1, replace=False))
        bounds = [0, *cuts.tolist(), used]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[b, lo:hi] = s
            bid[b, lo:lo + int(rng.integers(0, hi - lo + 1))] = 1
    return seg, bid


def visible_pairs(seg, bid, causal=True):
    """Exact count of visible (query, key) pairs, from the key-range form (no T*T mask needed)."""
    r = pallas_kernels.key_ranges(jnp.asarray(seg), jnp.asarray(bid), causal=causal)
    return int(jnp.sum(r["hi"] - r["lo"]))


def make_fn(impl, mode, seg, bid, args):
    if impl == "cudnn" and seg is not None:
        impl = "cudnn_dense"
    bs = None
    if args.block_q or args.block_k:
        d = pallas_kernels.default_block_sizes(impl, args.head_dim)
        bs = (args.block_q or d.block_q, args.block_k or d.block_k)

    def attn(q, k, v):
        return pallas_kernels.flash_attention(
            q, k, v, seg, bid, causal=True, implementation=impl, block_sizes=bs,
            interpret=args.interpret and impl.startswith("pallas"))

    if mode == "fwd":
        return jax.jit(attn)

    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def time_fn(fn, inputs, iters, warmup):
    for _ in range(max(warmup, 1)):
        jax.block_until_ready(fn(*inputs))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def skip_reason(impl, args):
    platform = jax.default_backend()
    if impl == "cudnn" and platform != "gpu":
        return "needs an NVIDIA GPU"
    if impl.startswith("pallas") and not args.interpret:
        wanted = "tpu" if impl == "pallas_tpu" else "gpu"
        if platform != wanted:
            return f"needs {wanted.upper()} (or --interpret)"
    return None


def run(args):
    dtype = jnp.dtype(args.dtype)
    H, D = args.num_heads, args.head_dim
    K = args.num_kv_heads or H
    rng = np.random.default_rng(args.seed)
    results = []
    for T in (int(t) for t in args.seq_lens.split(",")):
        B = max(args.tokens // T, 1)
        q = jnp.asarray(rng.standard_normal((B, T, H, D)), dtype)
        k = jnp.asarray(rng.standard_normal((B, T, K, D)), dtype)
        v = jnp.asarray(rng.standard_normal((B, T, K, D)), dtype)
        for mask in args.masks.split(","):
            if mask == "glm":
                seg_np, bid_np = glm_masks(rng, B, T, args.docs_per_row)
                seg, bid = jnp.asarray(seg_np), jnp.asarray(bid_np)
                pairs = visible_pairs(seg_np, bid_np)
            else:
                seg = bid = None
                pairs = B * T * (T + 1) // 2
            for impl in args.impls.split(","):
                for mode in args.modes.split(","):
                    rec = dict(impl=impl, mask=mask, mode=mode, batch=B, seq_len=T, heads=H,
                               kv_heads=K, head_dim=D, dtype=args.dtype,
                               device=jax.devices()[0].device_kind, visible_pairs=pairs)
                    if impl.startswith("pallas"):
                        bs = pallas_kernels.default_block_sizes(impl, D)
                        bq, bk = args.block_q or bs.block_q, args.block_k or bs.block_k
                        c = pallas_kernels.block_counts(seg, bid, True, T, bq, bk, batch=B)
                        rec["blocks"] = {n: int(x) for n, x in c.items()}
                    reason = skip_reason(impl, args)
                    if reason:
                        rec["skipped"] = reason
                    else:
                        try:
                            fn = make_fn(impl, mode, seg, bid, args)
                            sec = time_fn(fn, (q, k, v), args.iters, args.warmup)
                            per_pair = 4 * H * D * (3.5 if mode == "fwd_bwd" else 1.0)
                            rec.update(ms=sec * 1e3,
                                       tflops_visible=per_pair * pairs / sec / 1e12,
                                       tflops_dense=per_pair * B * T * T / sec / 1e12)
                        except Exception as e:  # OOM, unsupported shape: record and go on
                            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    results.append(rec)
                    print(format_row(rec), flush=True)
    return results


HEADER = f"{'T':>6} {'B':>3} {'mask':<7} {'mode':<8} {'impl':<11} {'ms':>9} " \
         f"{'TF/s vis':>9} {'TF/s dense':>10}  blocks computed/total"


def format_row(r):
    blocks = ""
    if "blocks" in r:
        b = r["blocks"]
        blocks = f"{b['partial'] + b['full']}/{b['total']} ({b['full']} full)"
    if "ms" not in r:
        status = r.get("skipped") or r.get("error")
        return (f"{r['seq_len']:>6} {r['batch']:>3} {r['mask']:<7} {r['mode']:<8} {r['impl']:<11} "
                f"{'-':>9} {'-':>9} {'-':>10}  {blocks} [{status}]")
    return (f"{r['seq_len']:>6} {r['batch']:>3} {r['mask']:<7} {r['mode']:<8} {r['impl']:<11} "
            f"{r['ms']:>9.2f} {r['tflops_visible']:>9.3f} {r['tflops_dense']:>10.3f}  {blocks}")


def speedups(results, baseline="cudnn"):
    """Per (T, mask, mode): every implementation's speed relative to ``baseline`` (time ratio)."""
    timed = {(r["seq_len"], r["mask"], r["mode"], r["impl"]): r["ms"] for r in results if "ms" in r}
    out = []
    for (T, mask, mode, impl), ms in timed.items():
        base = timed.get((T, mask, mode, baseline))
        if base and impl != baseline:
            out.append(dict(seq_len=T, mask=mask, mode=mode, impl=impl, baseline=baseline,
                            speedup=base / ms))
    return out


def main(argv=None):
    args = parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(HEADER, flush=True)
    results = run(args)
    ratios = speedups(results)
    for r in ratios:  # the H100 targets: glm fwd_bwd >= 1.5x, causal fwd >= 0.8x cuDNN
        print(f"{r['impl']} vs {r['baseline']}: T={r['seq_len']} {r['mask']} {r['mode']}: "
              f"{r['speedup']:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "jax": jax.__version__, "results": results,
                       "speedups": ratios}, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
