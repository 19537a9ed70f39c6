"""The CPU attention (glmjax/model/cpu_attention.py, hand-written backward) equals the XLA reference
attention and autodiff's gradients through it, with packed GLM masks, padding rows and GQA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.model.cpu_attention import attention_cpu
from pallas_kernels.reference import attention_xla


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cpu_attention_matches_reference_values_and_gradients(heads, kv_heads):
    rng = np.random.default_rng(heads * 10 + kv_heads)
    B, T, D = 2, 24, 16
    q = jnp.asarray(rng.standard_normal((B, T, heads, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, kv_heads, D)), jnp.float32)
    # row 0: two documents with bidirectional prefixes, then 4 padding positions; row 1: one document
    seg = jnp.asarray([[1] * 9 + [2] * 11 + [0] * 4, [1] * T], jnp.int32)
    bid = jnp.asarray([[1] * 4 + [0] * 5 + [1] * 3 + [0] * 12, [1] * 5 + [0] * (T - 5)], jnp.int32)
    g = jnp.asarray(rng.standard_normal((B, T, heads, D)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg, bid) * g)

    ref, out = attention_xla(q, k, v, seg, bid), attention_cpu(q, k, v, seg, bid)
    # float32: the same formula with a different summation order (D = 16 and S = 24 terms)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    assert np.all(np.asarray(out[0, T - 4:]) == 0)  # padding rows see nothing: exactly 0
    g_ref = jax.grad(loss(attention_xla), argnums=(0, 1, 2))(q, k, v)
    g_cpu = jax.grad(loss(attention_cpu), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_cpu, g_ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
    assert np.all(np.asarray(g_cpu[0][0, T - 4:]) == 0)
