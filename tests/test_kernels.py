"""Pallas attention kernels (interpret mode on CPU) against the XLA reference and float64 numpy.

Tolerances: float32 ``|a - ref| <= 1e-5 * (|ref| + max|ref|)`` elementwise, i.e. 1e-5 relative to
the tensor's scale; bfloat16 the same with 2e-2 (inputs rounded to bf16 before the numpy reference).
Shapes stay tiny (T ~ 200, blocks 32/64) because interpret mode is slow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import block_mask as bm

PALLAS = ("pallas_tpu", "pallas_gpu")


# ----------------------------------------------------------------------------- inputs & numpy
def packed_mask_inputs(rng, batch, length, *, min_pad=0, prefix=True):
    """Packed rows: random segment lengths (length-1 segments likely), a random Part A of length
    0..whole segment per segment, trailing padding. ``prefix=False`` scatters bid anywhere."""
    seg = np.zeros((batch, length), np.int32)
    bid = np.zeros((batch, length), np.int32)
    for b in range(batch):
        used = int(rng.integers(length // 2, length - min_pad + 1))
        pos, s = 0, 1
        while pos < used:
            n = int(min(used - pos, rng.choice([1, 1, 2, int(rng.integers(1, length // 2))])))
            seg[b, pos:pos + n] = s
            if prefix:
                bid[b, pos:pos + int(rng.integers(0, n + 1))] = 1
            else:
                bid[b, pos:pos + n] = rng.integers(0, 2, n)
            pos, s = pos + n, s + 1
    return seg, bid


def dense_mask(seg, bid, causal):
    """[B, T, T] numpy mask straight from DESIGN.md §3."""
    i = np.arange(seg.shape[1])
    m = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        m &= (i[None, None, :] <= i[None, :, None]) | (bid[:, None, :] != 0)
    return m


def numpy_attention(q, k, v, mask, do):
    """float64 forward and analytic gradients; q [B,T,H,D], k/v [B,T,K,D], mask [B,T,T]."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    kk, vv = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, kk) / np.sqrt(D)
    m = mask[:, None]
    s = np.where(m, s, -np.inf)
    mx = np.max(s, axis=-1, keepdims=True)
    p = np.where(m, np.exp(s - np.where(np.isfinite(mx), mx, 0)), 0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    o = np.einsum("bhts,bshd->bthd", p, vv)
    dp = np.einsum("bthd,bshd->bhts", do, vv)
    ds = p * (dp - np.einsum("bthd,bthd->bht", do, o)[..., None]) / np.sqrt(D)
    dq = np.einsum("bhts,bshd->bthd", ds, kk)
    dk = np.einsum("bhts,bthd->bshd", ds, q).reshape(B, T, -1, G, D).sum(3)
    dv = np.einsum("bhts,bthd->bshd", p, do).reshape(B, T, -1, G, D).sum(3)
    return o, (dq, dk, dv)


def run(impl, q, k, v, seg, bid, do, *, causal, block_sizes=None, interpret=True):
    """Output and (dq, dk, dv) in one jitted call."""
    def f(q, k, v):
        return pallas_kernels.flash_attention(q, k, v, seg, bid, causal=causal, implementation=impl,
                                              interpret=interpret, block_sizes=block_sizes)

    @jax.jit
    def go(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    o, grads = go(q, k, v, do)
    return np.asarray(o, np.float64), [np.asarray(g, np.float64) for g in grads]


def assert_close(actual, ref, tol, what):
    ref = np.asarray(ref, np.float64)
    np.testing.assert_allclose(actual, ref, rtol=tol, atol=tol * max(np.abs(ref).max(), 1e-30),
                               err_msg=what)
    assert np.all(np.isfinite(actual)), what


def random_qkvd(rng, B, T, H, K, D, dtype):
    q, do = (jnp.asarray(rng.standard_normal((B, T, H, D)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, D)), dtype) for _ in range(2))
    return q, k, v, do


# ----------------------------------------------------------------------------- kernel tests
CASES = {
    # name: (seed, B, T, H, K, D, causal, mask kind, block sizes)
    "glm_packed_gqa": (1, 2, 200, 4, 2, 64, True, "packed", (64, 64)),
    "packed_noncausal_mqa": (2, 2, 150, 2, 1, 64, False, "packed", (64, 32)),
    "causal_only": (3, 1, 100, 2, 2, 64, True, "none", (32, 64)),
}


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_xla_and_numpy_f32(impl, case):
    seed, B, T, H, K, D, causal, kind, bs = CASES[case]
    rng = np.random.default_rng(seed)
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.float32)
    if kind == "packed":
        seg_np, bid_np = packed_mask_inputs(rng, B, T)
        seg, bid = jnp.asarray(seg_np), jnp.asarray(bid_np)
    else:
        seg_np, bid_np = np.ones((B, T), np.int32), np.zeros((B, T), np.int32)
        seg = bid = None
    o, grads = run(impl, q, k, v, seg, bid, do, causal=causal, block_sizes=bs)
    o_x, grads_x = run("xla", q, k, v, seg, bid, do, causal=causal)
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, causal), do)
    assert_close(o, o_np, 1e-5, "out vs numpy")
    assert_close(o, o_x, 1e-5, "out vs xla")
    for name, g, gx, gn in zip("qkv", grads, grads_x, grads_np):
        assert_close(g, gn, 1e-5, f"d{name} vs numpy")
        assert_close(g, gx, 1e-5, f"d{name} vs xla")
    pad_rows = ~dense_mask(seg_np, bid_np, causal).any(-1)
    assert np.all(o[pad_rows] == 0) and np.all(grads[0][pad_rows] == 0)


@pytest.mark.parametrize("x64", [False, True], ids=["x64_off", "x64_on"])
@pytest.mark.parametrize("impl", ("xla", *PALLAS))
def test_works_with_x64_on_and_off(impl, x64):
    """Users turn on ``jax_enable_x64`` for float64 checks; index arithmetic must not mix int32/int64."""
    rng = np.random.default_rng(11)
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        q, k, v, do = random_qkvd(rng, 1, 96, 4, 2, 64, jnp.float32)
        seg_np, bid_np = packed_mask_inputs(rng, 1, 96)
        o, grads = run(impl, q, k, v, jnp.asarray(seg_np), jnp.asarray(bid_np), do, causal=True,
                       block_sizes=(32, 32))
    finally:
        jax.config.update("jax_enable_x64", old)
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(o, o_np, 1e-5, "out vs numpy")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(g, gn, 1e-5, f"d{name} vs numpy")


@pytest.mark.parametrize("impl", PALLAS)
def test_bfloat16_glm(impl):
    rng = np.random.default_rng(11)
    B, T, H, K, D = 2, 160, 4, 1, 64
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.bfloat16)
    seg_np, bid_np = packed_mask_inputs(rng, B, T)
    o, grads = run(impl, q, k, v, jnp.asarray(seg_np), jnp.asarray(bid_np), do, causal=True,
                   block_sizes=(64, 64))
    o_np, grads_np = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                     v.astype(jnp.float32), dense_mask(seg_np, bid_np, True),
                                     do.astype(jnp.float32))
    assert_close(o, o_np, 2e-2, "bf16 out")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(g, gn, 2e-2, f"bf16 d{name}")


@pytest.mark.parametrize("impl", PALLAS)
@pytest.mark.parametrize("D", [128, 256])
def test_head_dims(impl, D):
    rng = np.random.default_rng(D)
    B, T, H, K = 1, 72, 2, 1
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.float32)
    seg_np, bid_np = packed_mask_inputs(rng, B, T)
    o, grads = run(impl, q, k, v, jnp.asarray(seg_np), jnp.asarray(bid_np), do, causal=True,
                   block_sizes=(32, 32))
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(o, o_np, 1e-5, f"D={D} out")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(g, gn, 1e-5, f"D={D} d{name}")


@pytest.mark.parametrize("impl", PALLAS)
def test_non_prefix_bidirectional_and_split_segments(impl):
    """Outside the GLM data contract (bid not a prefix, a segment id reused after a gap): the
    block classification turns conservative and the exact element mask keeps results exact."""
    rng = np.random.default_rng(5)
    B, T, H, K, D = 1, 128, 2, 2, 64
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.float32)
    seg_np, bid_np = packed_mask_inputs(rng, B, T, prefix=False)
    seg_np[0, 100:110] = 1  # segment 1 again, far from its first occurrence
    o, grads = run(impl, q, k, v, jnp.asarray(seg_np), jnp.asarray(bid_np), do, causal=True,
                   block_sizes=(32, 32))
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(o, o_np, 1e-5, "out")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(g, gn, 1e-5, f"d{name}")


def test_tpu_kernel_under_tpu_semantics_interpreter():
    """pallas_tpu under ``pltpu.InterpretParams`` (simulated DMAs, SMEM/VMEM, scalar prefetch)."""
    from jax.experimental.pallas import tpu as pltpu
    rng = np.random.default_rng(21)
    B, T, H, K, D = 1, 200, 2, 1, 128
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.float32)
    seg_np, bid_np = packed_mask_inputs(rng, B, T)
    o, grads = run("pallas_tpu", q, k, v, jnp.asarray(seg_np), jnp.asarray(bid_np), do, causal=True,
                   block_sizes=(128, 128), interpret=pltpu.InterpretParams())
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(o, o_np, 1e-5, "out")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(g, gn, 1e-5, f"d{name}")


@pytest.mark.parametrize("impl", PALLAS)
def test_empty_blocks_are_never_loaded(impl):
    """NaN in every key block that no query sees: a kernel that loaded it would return NaN."""
    rng = np.random.default_rng(7)
    B, T, H, K, D = 1, 128, 2, 1, 64
    q, k, v, do = random_qkvd(rng, B, T, H, K, D, jnp.float32)
    seg_np = np.zeros((B, T), np.int32)
    seg_np[0, :40], seg_np[0, 40:90] = 1, 2  # keys 96.. are padding: key blocks 3 (of 32) empty
    bid_np = np.zeros((B, T), np.int32)
    bid_np[0, 40:50] = 1
    k_poison = k.at[:, 96:].set(jnp.nan)
    v_poison = v.at[:, 96:].set(jnp.nan)
    o, grads = run(impl, q, k_poison, v_poison, jnp.asarray(seg_np), jnp.asarray(bid_np), do,
                   causal=True, block_sizes=(32, 32))
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(o, o_np, 1e-5, "out")
    assert_close(grads[0], grads_np[0], 1e-5, "dq")
    assert np.all(grads[1][:, 96:] == 0) and np.all(grads[2][:, 96:] == 0)


@pytest.mark.parametrize("kv_heads, masks", [(1, True), (2, False)], ids=["mqa_glm", "gqa_causal"])
def test_sharded_on_mesh(kv_heads, masks):
    """``sharded_flash_attention`` on a (data, fsdp, tensor) = (2, 2, 2) mesh: per-device kernels
    under shard_map; with 1 kv head the heads cannot split over tensor=2 and stay replicated."""
    from jax.sharding import Mesh
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(40 + kv_heads)
    B, T, H, D = 4, 96, 4, 64
    q, k, v, do = random_qkvd(rng, B, T, H, kv_heads, D, jnp.float32)
    seg_np, bid_np = packed_mask_inputs(rng, B, T) if masks else (np.ones((B, T), np.int32),
                                                                  np.zeros((B, T), np.int32))
    seg, bid = (jnp.asarray(seg_np), jnp.asarray(bid_np)) if masks else (None, None)

    @jax.jit
    def go(q, k, v, do):
        f = lambda q, k, v: pallas_kernels.sharded_flash_attention(
            q, k, v, seg, bid, mesh=mesh, implementation="pallas_gpu", interpret=True,
            block_sizes=(32, 32))
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    o, grads = go(q, k, v, do)
    o_np, grads_np = numpy_attention(q, k, v, dense_mask(seg_np, bid_np, True), do)
    assert_close(np.asarray(o), o_np, 1e-5, "out")
    for name, g, gn in zip("qkv", grads, grads_np):
        assert_close(np.asarray(g), gn, 1e-5, f"d{name}")


@pytest.mark.parametrize("impl, platform", [("pallas_tpu", "tpu"), ("pallas_gpu", "cuda")])
def test_kernels_lower_for_their_hardware(impl, platform):
    """Forward + backward lower through the Mosaic TPU / Triton lowerings (bf16, D=128, GQA): no
    hardware here, but unsupported ops or block shapes fail already at this stage."""
    from pallas_kernels.flash import KernelConfig, flash
    cfg = KernelConfig(impl, True, 128, 128 if impl == "pallas_tpu" else 64, False)
    q = jax.ShapeDtypeStruct((2, 300, 4, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 128), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    loss = lambda q, k, v, s, b: jnp.sum(flash(q, k, v, s, b, cfg).astype(jnp.float32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids, ids).lower(
        lowering_platforms=(platform,))
    text = lowered.as_text()
    assert ("tpu_custom_call" in text) if impl == "pallas_tpu" else ("triton" in text)


# ----------------------------------------------------------------------------- block counts
@pytest.mark.parametrize("causal", [True, False])
def test_block_counts_match_dense_mask(causal):
    rng = np.random.default_rng(100 + causal)
    counts_fn = jax.jit(pallas_kernels.block_counts, static_argnums=(2, 3, 4, 5))
    for B, T, bq, bk in [(2, 200, 32, 64), (3, 130, 64, 16), (2, 77, 16, 16)] * 5:
        seg, bid = packed_mask_inputs(rng, B, T)
        counts = counts_fn(jnp.asarray(seg), jnp.asarray(bid), causal, T, bq, bk)
        Tp = bm.padded_length(T, bq, bk)
        m = np.zeros((B, Tp, Tp), bool)
        m[:, :T, :T] = dense_mask(seg, bid, causal)
        blocks = m.reshape(B, Tp // bq, bq, Tp // bk, bk)
        nonempty, full = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
        assert counts["total"] == nonempty.size
        assert int(counts["empty"]) == int((~nonempty).sum())
        assert int(counts["full"]) == int(full.sum())
        assert int(counts["partial"]) == int((nonempty & ~full).sum())


@pytest.mark.parametrize("prefix", [True, False])
def test_key_ranges_bound_the_mask(prefix):
    """Outer ranges contain every visible pair, full ranges only visible pairs (rows and columns);
    with GLM data (bid a prefix of contiguous segments) all of them are exact."""
    rng = np.random.default_rng(300 + prefix)
    seg, bid = packed_mask_inputs(rng, 3, 90, prefix=prefix)
    if not prefix:
        seg[0, 70:75] = 1  # a segment id reused after a gap
    for causal in (True, False):
        m = dense_mask(seg, bid, causal)
        r = {n: np.asarray(x) for n, x in
             pallas_kernels.key_ranges(jnp.asarray(seg), jnp.asarray(bid), causal=causal).items()}
        j = np.arange(90)
        rows = lambda a, b: (j[None, None, :] >= r[a][:, :, None]) & (j[None, None, :] < r[b][:, :, None])
        cols = lambda a, b: (j[None, :, None] >= r[a][:, None, :]) & (j[None, :, None] < r[b][:, None, :])
        outer, inner = rows("lo", "hi"), rows("full_lo", "full_hi")
        q_outer, q_inner = cols("q_lo", "q_hi"), cols("full_q_lo", "full_q_hi")
        assert not (m & ~outer).any() and not (inner & ~m).any()
        assert not (m & ~q_outer).any() and not (q_inner & ~m).any()
        if prefix:
            assert (outer == m).all() and (inner == m).all() and (q_inner == m).all()


@pytest.mark.parametrize("transposed", [False, True], ids=["query_blocks", "key_blocks"])
def test_tpu_block_ranges_hold_every_nonempty_block(transposed):
    """The TPU schedule (``block_ranges``, 4 ints per row block): every non-empty block lies in the
    row block's range, the FULL ones are exactly its full interval, and on GLM data without padding
    between segments the range is tight (its first and last blocks are non-empty). Rows = query
    blocks (forward, dq) or key blocks (dk/dv)."""
    rng = np.random.default_rng(77 + transposed)
    B, T, Tp, bq, bk = 2, 150, 160, 32, 16
    seg, bid = packed_mask_inputs(rng, B, T, min_pad=40)
    r = bm.key_ranges(*bm.pad_mask_inputs(jnp.asarray(seg), jnp.asarray(bid), batch=B, seq_len=T,
                                          padded=Tp), causal=True)
    m = np.zeros((B, Tp, Tp), bool)
    m[:, :T, :T] = dense_mask(seg, bid, True)
    if transposed:
        m, names, (rb, cb) = np.swapaxes(m, 1, 2), ("q_lo", "q_hi", "full_q_lo", "full_q_hi"), (bk, bq)
    else:
        names, (rb, cb) = ("lo", "hi", "full_lo", "full_hi"), (bq, bk)
    blocks = m.reshape(B, Tp // rb, rb, Tp // cb, cb)
    nonempty, full = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
    first, count, ffirst, fend = (np.asarray(x) for x in bm.block_ranges(*(r[n] for n in names), rb, cb))
    assert first.shape == (B, Tp // rb)
    j = np.arange(Tp // cb)
    in_range = (j >= first[..., None]) & (j < (first + count)[..., None])
    assert not (nonempty & ~in_range).any()
    np.testing.assert_array_equal(full, (j >= ffirst[..., None]) & (j < fend[..., None]))
    np.testing.assert_array_equal(count > 0, nonempty.any(-1))
    # tight: the range's first and last blocks are visible ones
    b_, i_ = np.nonzero(count > 0)
    assert nonempty[b_, i_, first[b_, i_]].all() and nonempty[b_, i_, first[b_, i_] + count[b_, i_] - 1].all()


def test_block_counts_pure_causal():
    c = pallas_kernels.block_counts(None, None, True, 1024, 128, 128)
    assert (int(c["empty"]), int(c["partial"]), int(c["full"])) == (28, 8, 28)


# ----------------------------------------------------------------------------- dispatch & errors
def test_cudnn_dense_mask_semantics():
    """The dense-bias path of "cudnn_dense", run through jax.nn's XLA backend on CPU."""
    from pallas_kernels.cudnn import attention_cudnn
    rng = np.random.default_rng(9)
    q, k, v, do = random_qkvd(rng, 2, 64, 4, 2, 64, jnp.float32)
    seg, bid = packed_mask_inputs(rng, 2, 64)
    o = attention_cudnn(q, k, v, jnp.asarray(seg), jnp.asarray(bid), causal=True, dense_mask=True,
                        sdpa_implementation="xla")
    o_np, _ = numpy_attention(q, k, v, dense_mask(seg, bid, True), do)
    assert_close(np.asarray(o), o_np, 1e-5, "cudnn_dense out")
    with pytest.raises(ValueError, match="cannot express"):
        attention_cudnn(q, k, v, jnp.asarray(seg), jnp.asarray(bid), sdpa_implementation="xla")


def test_tpu_block_sizes_must_fit_lanes():
    from pallas_kernels.api import BlockSizes, _check_tpu_tiling
    _check_tpu_tiling(BlockSizes(256, 128), 1000)
    _check_tpu_tiling(BlockSizes(64, 64), 50)  # one block spans the whole (padded) sequence
    with pytest.raises(ValueError, match="multiples of 128"):
        _check_tpu_tiling(BlockSizes(64, 128), 1000)


def test_auto_is_xla_on_cpu():
    assert pallas_kernels.resolve_implementation("auto") == "xla"


@pytest.mark.parametrize("kwargs, shapes, match", [
    (dict(implementation="flash"), None, "unknown attention implementation"),
    (dict(implementation="cudnn"), None, "needs an NVIDIA GPU"),
    (dict(implementation="pallas_tpu"), None, "interpret=True"),
    (dict(implementation="pallas_gpu", interpret=True, block_sizes=(48, 64)), None, "power of two"),
    (dict(), ((1, 8, 3, 16), (1, 8, 2, 16)), "not divisible by num kv heads"),
    (dict(), ((1, 8, 2, 16), (1, 6, 2, 16)), "self-attention only"),
    (dict(), ((1, 8, 2, 16), (1, 8, 2, 32)), "share batch and head_dim"),
])
def test_user_errors(kwargs, shapes, match):
    q_shape, k_shape = shapes or ((1, 8, 2, 16), (1, 8, 2, 16))
    q, k = jnp.ones(q_shape), jnp.ones(k_shape)
    with pytest.raises(ValueError, match=match):
        pallas_kernels.flash_attention(q, k, k, **kwargs)
