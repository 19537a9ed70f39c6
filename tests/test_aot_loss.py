"""The vocab-chunked loss (model.loss_chunk) equals the plain float32 cross-entropy and its gradients.

Reference: ``cross_entropy_sums`` on the full ``[B, T, V]`` logits (and float64 NumPy for the value).
Tolerance 1e-6 relative: both are float32 sums of ~B*T terms of size ~log(V) reordered by chunking.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glmjax.train.loss import chunked_cross_entropy_sums
from glmjax.train.step import cross_entropy_sums


def _inputs(seed, B=3, T=24, D=16, V=257):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(D, V)) * 0.7, jnp.float32)
    t = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    w = rng.uniform(0.2, 1.5, (B, T)).astype(np.float32)
    w[:, T - 5:] = 0.0  # padding at the row ends
    w[1, :7] = 0.0
    return x, head, t, jnp.asarray(w)


def _plain(x, head, t, w):
    logits = jnp.einsum("btd,dv->btv", x, head, precision="highest")
    return cross_entropy_sums(logits, t, w)


@pytest.mark.parametrize("chunk", [1, 6, 24])
def test_chunked_loss_and_grads_equal_plain(chunk):
    x, head, t, w = _inputs(chunk)
    with jax.default_matmul_precision("highest"):
        (s, n), grads = jax.jit(jax.value_and_grad(
            lambda x, h, w: chunked_cross_entropy_sums(x, h, t, w, chunk), argnums=(0, 1, 2),
            has_aux=True))(x, head, w)
        (s0, n0), grads0 = jax.jit(jax.value_and_grad(
            lambda x, h, w: _plain(x, h, t, w), argnums=(0, 1, 2), has_aux=True))(x, head, w)
    # float64 numpy value
    lg = np.einsum("btd,dv->btv", np.float64(x), np.float64(head))
    mx = lg.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(lg - mx).sum(-1, keepdims=True)))[..., 0]
    ref = np.sum((lse - np.take_along_axis(lg, np.asarray(t)[..., None], -1)[..., 0]) * np.float64(w))
    assert abs(float(s) - ref) <= 1e-6 * abs(ref)
    assert float(n) == float(n0) == pytest.approx(float(np.sum(w)), rel=1e-7)
    assert abs(float(s) - float(s0)) <= 1e-6 * abs(float(s0))
    for name, g, g0 in zip(("x", "head", "weights"), grads, grads0):
        g, g0 = np.asarray(g), np.asarray(g0)
        assert np.abs(g0).max() > 0
        err = np.abs(g - g0).max() / np.abs(g0).max()
        assert err <= 1e-6, (name, err)
    # padded tokens get exactly zero gradient on x
    assert np.all(np.asarray(grads[0])[:, -5:] == 0)


def test_chunked_loss_rejects_a_chunk_that_does_not_divide():
    x, head, t, w = _inputs(0)
    with pytest.raises(ValueError, match="divisor of the sequence length 24"):
        chunked_cross_entropy_sums(x, head, t, w, 5)


def test_train_step_with_loss_chunk_matches_unchunked():
    """The whole model: loss and gradient norm of one train step equal with and without chunking."""
    from glmjax.config import base_config, validate
    from glmjax.sharding import make_mesh
    from glmjax.train.state import init_state, model_spec
    from glmjax.train.step import make_train_step

    out = []
    for chunk in (0, 16):
        cfg = base_config()
        cfg.batch_size, cfg.seq_len = 8, 32
        cfg.model.num_layers, cfg.model.vocab_size = 1, 512
        cfg.model.loss_chunk = chunk
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
        validate(cfg, 8)
        mesh = make_mesh(cfg)
        spec = model_spec(cfg, mesh)
        state = init_state(cfg, spec)
        rng = np.random.default_rng(1)
        tok = rng.integers(1, 512, (8, 32)).astype(np.int32)
        batch = {"tokens": tok, "targets": np.roll(tok, -1, 1), "loss_weights": (tok > 40).astype(np.float32),
                 "segment_ids": np.ones_like(tok), "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)),
                 "block_positions": np.zeros_like(tok), "bidirectional": np.zeros_like(tok)}
        with jax.default_matmul_precision("highest"):
            _, m = make_train_step(cfg, spec, mesh)(state, batch)
        out.append({k: float(v) for k, v in m.items()})
    assert out[0]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)
    assert out[0]["grad_norm"] == pytest.approx(out[1]["grad_norm"], rel=1e-5)
