"""The GLM model against an independent float64 NumPy reference (tests/reference_model.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels
from glmjax.config import load_config
from glmjax.model.glm import GLM
from glmjax.train.state import abstract_params
from glmjax.scaling.flops import param_count
from helpers import random_glm_features, random_params, run_model, small_model_cfg
from pathlib import Path

from reference_model import attention_ref, forward_ref, mask_loops


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("case", ["causal", "packed", "bidirectional_gqa", "mqa_noncausal"])
def test_attention_matches_loop_reference(case):
    rng = np.random.default_rng(hash(case) % 2**32)
    B, T, H, K, D = 2, 24, 4, {"causal": 4, "packed": 4, "bidirectional_gqa": 2, "mqa_noncausal": 1}[case], 16
    feats = random_glm_features(rng, B, T, 50)
    seg, bidir = feats["segment_ids"], feats["bidirectional"]
    if case == "causal":
        seg, bidir = np.ones((B, T), np.int32), np.zeros((B, T), np.int32)
    elif case == "packed":
        bidir = np.zeros((B, T), np.int32)
    causal = case != "mqa_noncausal"
    q, k, v = (rng.normal(size=s) for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    got = pallas_kernels.flash_attention(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                         jnp.asarray(v, jnp.float32), jnp.asarray(seg), jnp.asarray(bidir),
                                         causal=causal, implementation="xla")
    want = attention_ref(q, k, v, mask_loops(seg, bidir, causal=causal))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)
    assert np.abs(want).max() > 0.1  # rows with visible keys exist


@pytest.mark.parametrize("preset,scan", [("glm130b", True), ("glm4", True), ("glm4", False)])
def test_forward_matches_reference(preset, scan):
    if preset == "glm130b":
        m = small_model_cfg(norm="deepnorm", mlp="geglu", rope_2d=True, num_kv_heads=4, tie_embeddings=True,
                            scan_layers=scan)
    else:
        m = small_model_cfg(norm="rmsnorm_pre", mlp="swiglu", rope_2d=False, num_kv_heads=2, scan_layers=scan)
    rng = np.random.default_rng(7)
    feats = random_glm_features(rng, 2, 20, m.vocab_size)
    params = random_params(GLM(m, nnx.Rngs(1)), seed=3)
    got = run_model(m, params, feats)
    want = forward_ref(params, m, feats)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.1


def test_2d_rope_with_zero_block_positions_equals_1d():
    m2 = small_model_cfg(rope_2d=True)
    m1 = small_model_cfg(rope_2d=False)
    rng = np.random.default_rng(11)
    feats = random_glm_features(rng, 2, 16, m1.vocab_size)
    params = random_params(GLM(m2, nnx.Rngs(0)), seed=5)
    out_1d = run_model(m1, params, feats)
    out_2d = run_model(m2, params, {**feats, "block_positions": np.zeros_like(feats["block_positions"])})
    np.testing.assert_array_equal(out_2d, out_1d)
    # and non-zero block positions do change the 2D model's output
    assert np.abs(run_model(m2, params, feats) - out_1d).max() > 1e-3


# tests/test_glm_originals.py checks the released presets against the released checkpoints' tensor shapes;
# here the analytic count used for FLOPs and planning (glmjax/scaling/flops.py) equals the model's own
@pytest.mark.parametrize("path,target", [("configs/glm130b.py", 128.7e9), ("configs/chatglm_6b.py", 6.17e9),
                                         ("configs/glm4_9b.py", 9.4e9), ("configs/tiny.py", None)])
def test_full_size_param_counts_without_allocating(path, target):
    m = load_config(str(REPO / path)).model
    _, shapes, _ = abstract_params(m)  # jax.eval_shape under the hood: nothing is allocated
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    if target:
        assert abs(n - target) / target < 0.02, f"{path}: {n / 1e9:.2f}B parameters"
    assert param_count(m)[0] == n  # the analytic count used for FLOPs agrees, exactly
