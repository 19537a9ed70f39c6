"""UNVERIFIED / failing drafts (not collected by pytest): SP memory, GQA-sharded, DeepNorm bf16.
Move into tests/test_parallel_layout.py once they pass."""
from test_parallel_layout import *  # noqa


def test_sequence_parallel_cuts_per_device_temporaries():
    """A mid-size config on (data 1, tensor 8), remat of whole layers: the saved per-layer residual
    stream is split 8 ways along length with sequence parallelism."""
    mesh = mesh_of(1, 8)
    temps = {}
    for sp in (False, True):
        m = model_cfg(sequence_parallel=sp, num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=8,
                      head_dim=64, mlp_dim=1024, vocab_size=1024, remat="full")
        f, psh = grad_fn(m, mesh)
        _, abs_params, _ = abstract_params(m)
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abs_params, psh)
        feats = {k: jax.ShapeDtypeStruct((2, 1024), jnp.int32) for k in
                 ("tokens", "targets", "segment_ids", "positions", "block_positions", "bidirectional")}
        feats["loss_weights"] = jax.ShapeDtypeStruct((2, 1024), jnp.float32)
        temps[sp] = f.lower(params, feats).compile().memory_analysis().temp_size_in_bytes
    print("per-device temporaries (bytes) sp off / on:", temps)
    assert temps[True] < 0.8 * temps[False], temps


def test_gqa_fewer_kv_heads_than_tensor_stays_sharded():
    """2 kv heads, tensor 4 (the GLM-4-9B case): kv heads repeated to 4, the Pallas kernel (interpret
    mode) gets q split by head, and the loss / gradients equal one device."""
    m = model_cfg(num_kv_heads=2, attention_impl="pallas", num_layers=1)
    params = random_params(m, 3)
    batch = batch_of(np.random.default_rng(4), 2, 32, 128)
    f1, _ = grad_fn(m, mesh_of(1, 1))
    l1, g1 = jax.device_get(f1(params, batch))
    mesh = mesh_of(2, 4)
    f8, _ = grad_fn(m, mesh)
    l8, g8 = jax.device_get(f8(params, batch))
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max())  # float32 cancellation
    text = f8.lower(params, batch).as_text()
    # every operand of the attention shard_map is split over 'tensor' on its head dim
    manual = re.findall(r"sdy\.manual_computation\(.*?in_shardings=\[(.*?)\] out_shardings", text)
    assert manual, "no shard_map in the lowered program"
    for ins in manual:
        qkv = re.findall(r"<@mesh, \[(.*?)\]>", ins)[:3]
        assert len(qkv) == 3 and all(s.split(",")[2].strip() == '{"tensor"}' for s in qkv), ins


def test_deepnorm_bf16_matches_float32_block():
    m = model_cfg(num_layers=70, norm="deepnorm", mlp="geglu", num_kv_heads=8, rope_2d=True,
                  init_std=0.02)
    blocks = {dt: Block(model_cfg(**{**m.to_dict(), "dtype": dt}), nnx.Rngs(0)) for dt in ("float32", "bfloat16")}
    assert abs(blocks["float32"].alpha - 140 ** 0.5) < 1e-9
    nnx.update(blocks["bfloat16"], nnx.state(blocks["float32"], nnx.Param))
    rng = np.random.default_rng(5)
    B, T = 2, 64
    feats = {k: jnp.asarray(v) for k, v in random_glm_features(rng, B, T, 128).items()}
    x = jnp.asarray(rng.normal(size=(B, T, 64)), jnp.bfloat16)  # unit scale, as a LayerNorm output
    ref = np.asarray(blocks["float32"](x.astype(jnp.float32), feats), np.float64)
    got = np.asarray(blocks["bfloat16"](x, feats).astype(jnp.float32), np.float64)
    # the output is LN(alpha*x + f): unit scale, so bf16 rounding alone is ~2^-9 RMS relative; the
    # sublayers themselves run in bf16 and add about as much. A bf16 residual sum adds alpha-scaled
    # rounding (~12x larger in units of the sublayer's contribution).
    rounding = np.sqrt(np.mean((np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64) - ref) ** 2))
    err = np.sqrt(np.mean((got - ref) ** 2))
    print("deepnorm bf16 rms err", err, "bf16 output rounding", rounding)
    assert err < 3 * rounding, (err, rounding)
