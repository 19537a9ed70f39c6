"""Cross-entropy over the output projection in sequence chunks, never materialising ``[B, T, vocab]``.

GLM vocabularies have ~150k entries: at real batch sizes the float32 logits and their gradient are
the largest buffers of a train step (glm4_9b at 4 x 8192 tokens per chip: 20 GB each). With
``model.loss_chunk = c`` the loss is computed ``c`` positions of every row at a time: forward keeps
only the per-token log-normaliser ``[B, T]``; backward recomputes each chunk's logits, forms
``dlogits = w * (softmax - onehot)`` and accumulates the head gradient in float32. Peak extra memory
is one chunk's logits ``[B, c, vocab]`` instead of the whole sequence's. Values and gradients equal
the unchunked loss up to float32 summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from glmjax.sharding import constrain

_F32 = jnp.float32


def _chunks(x, chunk):
    """[B, T, ...] -> [T/chunk, B, chunk, ...] (the scan runs over the leading axis)."""
    b, t = x.shape[:2]
    return x.reshape(b, t // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)


def _unchunk(x):
    n, b, c = x.shape[:3]
    return x.swapaxes(0, 1).reshape(b, n * c, *x.shape[3:])


def _logits(x_BcD, head_DV):
    logits = jnp.einsum("bcd,dv->bcv", x_BcD, head_DV, preferred_element_type=_F32)
    return constrain(logits, ("batch", "length", "vocab"))


def _picked(logits, t):
    return jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _loss_sum(x_BTD, head_DV, targets_BT, weights_BT, chunk):
    return _forward(x_BTD, head_DV, targets_BT, weights_BT, chunk)[0]


def _forward(x, head, targets, weights, chunk):
    def body(total, inp):
        x_c, t_c, w_c = inp
        logits = _logits(x_c, head)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tok = lse - _picked(logits, t_c)
        return total + jnp.sum(tok * w_c.astype(_F32)), (lse, tok)

    total, (lse, tok) = jax.lax.scan(body, jnp.zeros((), _F32),
                                     (_chunks(x, chunk), _chunks(targets, chunk), _chunks(weights, chunk)))
    return total, (_unchunk(lse), _unchunk(tok))


def _fwd(x, head, targets, weights, chunk):
    total, (lse, tok) = _forward(x, head, targets, weights, chunk)
    return total, (x, head, targets, weights, lse, tok)


def _bwd(chunk, res, g):
    x, head, targets, weights, lse, tok = res
    vocab = head.shape[1]

    def body(dhead, inp):
        x_c, t_c, w_c, lse_c = inp
        logits = _logits(x_c, head)
        p = jnp.exp(logits - lse_c[..., None])
        onehot = jax.nn.one_hot(t_c, vocab, dtype=_F32)
        dlogits = constrain((g * w_c.astype(_F32))[..., None] * (p - onehot), ("batch", "length", "vocab"))
        dx_c = jnp.einsum("bcv,dv->bcd", dlogits.astype(head.dtype), head,
                          preferred_element_type=_F32).astype(x.dtype)
        dhead = dhead + jnp.einsum("bcd,bcv->dv", x_c, dlogits.astype(x_c.dtype), preferred_element_type=_F32)
        return dhead, dx_c

    dhead, dx = jax.lax.scan(body, jnp.zeros(head.shape, _F32),
                             (_chunks(x, chunk), _chunks(targets, chunk), _chunks(weights, chunk),
                              _chunks(lse, chunk)))
    dweights = (g * tok).astype(weights.dtype)
    return _unchunk(dx), dhead.astype(head.dtype), None, dweights


_loss_sum.defvjp(_fwd, _bwd)


def chunked_cross_entropy_sums(x_BTD, head_DV, targets_BT, weights_BT, chunk: int):
    """(sum of weighted token losses, sum of weights) of ``logits = x @ head`` in float32, computed
    ``chunk`` sequence positions at a time (``chunk`` must divide the length)."""
    T = x_BTD.shape[1]
    if chunk <= 0 or T % chunk:
        raise ValueError(f"loss chunk {chunk} must be a positive divisor of the sequence length {T}: "
                         f"set model.loss_chunk to a divisor of seq_len (or 0 to disable chunking)")
    total = _loss_sum(x_BTD, head_DV, targets_BT, weights_BT, int(chunk))
    return total, jnp.sum(weights_BT.astype(_F32))
