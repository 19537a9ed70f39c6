"""The pallas_tpu attention kernels, forward and backward, compiled by the real Mosaic / XLA:TPU
compilers (libtpu on this CPU host) for v5e, v5p and v6e, inside ``shard_map`` on a 4-chip mesh.

Interpret mode (tests/test_kernels.py) checks the numbers; this checks that Mosaic accepts the
kernels at real tilings: causal and packed GLM masks, MHA and GQA, head_dim 64 / 128 / 256, the
default block sizes and others. One compile per generation holds two of the variants (fast enough for
the suite); the compiled program must contain the Mosaic custom calls (fwd, dq, dk/dv per variant).
A missing libtpu fails the test with the fix. Also: fwd+bwd at T = 131,072 and 262,144 tokens (the
long-context schedule; compile times in docs/benchmarks.md).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from aot_helpers import tpu_devices

# (heads, kv_heads, head_dim, length, block_sizes, masked)
VARIANTS = [
    (4, 4, 128, 512, None, False),  # MHA, causal only, default blocks (256, 256)
    (8, 2, 64, 512, (128, 128), True),  # GQA, packed GLM mask (segments + bidirectional prefix)
    (4, 2, 256, 1024, (256, 512), True),  # head_dim 256, unequal blocks
    (4, 1, 128, 256, (128, 256), True),  # MQA
]


# Each generation compiles two variants (all four on every generation pass too, but take ~3x longer).
PLAN = {"v5e:2x2": (0, 1), "v5p:2x2x1": (1, 2), "v6e:2x2": (2, 3)}


@pytest.mark.parametrize("topology", list(PLAN))
def test_pallas_tpu_attention_compiles_for_tpu(topology):
    variants = [VARIANTS[i] for i in PLAN[topology]]
    _, devices = tpu_devices(topology)
    mesh = Mesh(np.asarray(devices).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
    batch = 4
    args = []
    for H, K, D, T, _, masked in variants:
        qkv = NamedSharding(mesh, P("fsdp", None, "tensor", None))
        kv = NamedSharding(mesh, P("fsdp", None, "tensor" if K % 2 == 0 else None, None))
        rows = NamedSharding(mesh, P("fsdp", None))
        a = [jax.ShapeDtypeStruct((batch, T, H, D), jnp.bfloat16, sharding=qkv),
             jax.ShapeDtypeStruct((batch, T, K, D), jnp.bfloat16, sharding=kv),
             jax.ShapeDtypeStruct((batch, T, K, D), jnp.bfloat16, sharding=kv)]
        if masked:
            a += [jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=rows)] * 2
        args.append(tuple(a))

    def loss(all_args):
        total = 0.0
        for (H, K, D, T, bs, masked), a in zip(variants, all_args):
            q, k, v, *m = a
            seg, bid = m if masked else (None, None)
            o = pallas_kernels.sharded_flash_attention(q, k, v, seg, bid, mesh=mesh, causal=True,
                                                       implementation="pallas_tpu", block_sizes=bs)
            total = total + jnp.sum(o.astype(jnp.float32) ** 2)
        return total

    def step(all_args):
        diff = [a[:3] for a in all_args]
        rest = [a[3:] for a in all_args]
        return jax.grad(lambda d: loss([(*x, *r) for x, r in zip(d, rest)]))(diff)

    with pallas_kernels.compile_for("tpu"):
        lowered = jax.jit(step).lower(args)
    compiled = lowered.compile()
    text = compiled.as_text()
    assert text.count("tpu_custom_call") >= 3 * len(variants), text.count("tpu_custom_call")


def long_context_step(T, *, batch=1, heads=2, kv_heads=1, head_dim=128):
    """Lowered fwd+bwd of pallas_tpu at length T on one abstract v5p chip: bf16, default blocks
    (256, 256), a packed GLM mask (segment ids + bidirectional prefix; traced, so the schedule is
    the general one)."""
    _, devices = tpu_devices("v5p:2x2x1")
    rep = NamedSharding(Mesh(np.asarray(devices[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")), P())
    q = jax.ShapeDtypeStruct((batch, T, heads, head_dim), jnp.bfloat16, sharding=rep)
    kv = jax.ShapeDtypeStruct((batch, T, kv_heads, head_dim), jnp.bfloat16, sharding=rep)
    ids = jax.ShapeDtypeStruct((batch, T), jnp.int32, sharding=rep)

    def loss(q, k, v, seg, bid):
        o = pallas_kernels.flash_attention(q, k, v, seg, bid, causal=True, implementation="pallas_tpu")
        return jnp.sum(o.astype(jnp.float32) ** 2)

    with pallas_kernels.compile_for("tpu"):
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, ids, ids)


@pytest.mark.parametrize("T", [131072, 262144], ids=["128k", "256k"])
def test_pallas_tpu_attention_compiles_at_long_context(T):
    """T = 131,072 (GLM-4's context) and 262,144 (past GLM-5's 200k), one sequence, GQA 2:1: the
    per-query-block schedule needs 4 int32 per block row in SMEM (2 x 1024 x 4 at 256k), where the
    old flat list of block pairs needed B (T/256)^2 x 2 int32 = 2 MiB at 128k and Mosaic refused it
    ("Ran out of memory in memory space smem"). The sort-free schedule computation keeps the 256k
    compile at ~11 s here (the sorted one: ~48 s; docs/benchmarks.md)."""
    compiled = long_context_step(T).compile()
    assert compiled.as_text().count("tpu_custom_call") >= 3
    # Compiler temporaries measured 2.0 KiB per token at both lengths (257 / 513 MiB); an lse or
    # delta stored [B, H, T, 1] (tiled T(8,128): 128-fold padding) would add 1 KiB per array here.
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 2.5 * 1024 * T, (T, temp / T)
