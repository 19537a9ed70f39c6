"""Rotary knobs: ``model.rope_style`` (interleaved | half) and ``model.partial_rotary_factor``."""
import numpy as np
import pytest
from flax import nnx

from glmjax.config import ConfigError, base_config, validate
from glmjax.model.glm import GLM
from glmjax.model.rope import half_to_interleaved, interleaved_to_half
from helpers import random_glm_features, random_params, run_model, small_model_cfg
from reference_model import forward_ref


@pytest.mark.parametrize("style,factor,rope_2d", [("half", 1.0, False), ("half", 0.5, True),
                                                  ("interleaved", 0.25, True), ("half", 0.25, False)])
def test_rotary_knobs_match_reference(style, factor, rope_2d):
    m = small_model_cfg(rope_style=style, partial_rotary_factor=factor, rope_2d=rope_2d)
    rng = np.random.default_rng(21)
    feats = random_glm_features(rng, 2, 18, m.vocab_size)
    params = random_params(GLM(m, nnx.Rngs(0)), seed=8)
    got = run_model(m, params, feats)
    want = forward_ref(params, m, feats)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.std(want) > 0.1


def _permute_qk(params, perm):
    out = {**params, "layers": {**params["layers"], "attn": dict(params["layers"]["attn"])}}
    a = out["layers"]["attn"]
    for name in ("wq", "wk", "bq", "bk"):
        a[name] = a[name][..., perm]
    return out


@pytest.mark.parametrize("factor,rope_2d", [(1.0, False), (0.5, True), (0.25, False)])
def test_interleaved_and_half_agree_up_to_the_qk_permutation(factor, rope_2d):
    half = small_model_cfg(rope_style="half", partial_rotary_factor=factor, rope_2d=rope_2d)
    inter = small_model_cfg(rope_style="interleaved", partial_rotary_factor=factor, rope_2d=rope_2d)
    rng = np.random.default_rng(5)
    feats = random_glm_features(rng, 2, 16, half.vocab_size)
    params = random_params(GLM(half, nnx.Rngs(0)), seed=2)
    perm = half_to_interleaved(half.head_dim, factor, rope_2d)
    out_half = run_model(half, params, feats)
    out_inter = run_model(inter, _permute_qk(params, perm), feats)
    # same float32 function up to summation order of the q.k dot products
    np.testing.assert_allclose(out_inter, out_half, rtol=2e-5, atol=2e-5)
    # the permutation matters (without it the models differ) and inverts
    assert np.abs(run_model(inter, params, feats) - out_half).max() > 1e-2
    np.testing.assert_array_equal(perm[interleaved_to_half(half.head_dim, factor, rope_2d)],
                                  np.arange(half.head_dim))


def test_defaults_are_the_original_rotary():
    m = base_config().model
    assert (m.rope_style, m.partial_rotary_factor) == ("interleaved", 0.5)


@pytest.mark.parametrize("key,value,rope_2d,needle", [
    ("rope_style", "rotate", False, "rope_style='rotate' is not one of interleaved, half"),
    ("partial_rotary_factor", 0.75, True, "partial_rotary_factor=0.75"),
    ("partial_rotary_factor", 0.3, False, "even whole number"),
    ("partial_rotary_factor", 0.0, False, "partial_rotary_factor=0.0"),
])
def test_rotary_knob_validation(key, value, rope_2d, needle):
    c = base_config()
    c.model.rope_2d = rope_2d
    c.model[key] = value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        validate(c)
