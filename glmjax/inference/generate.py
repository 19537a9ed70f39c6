"""Sampling with a KV cache (prefill once, then one token per step) and GLM blank filling.

:func:`generate_ids` is the core: a batch of id prompts of different lengths, each with its own 2D
positions and bidirectional prefix, and a rule for the positions of new tokens (causal text: position
+1, block position 0; a GLM blank: position fixed at the mask, block position +1). ``use_cache=False``
recomputes the full forward pass (the training code path) for every token: the reference the cache is
tested against. :func:`generate` takes text: a prompt with ``[MASK]``/``[sMASK]``/``[gMASK]`` is filled
the GLM way (Part A bidirectional, then ``<sop> span <eop>`` per blank, left to right).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from glmjax.inference.decode import init_cache, jitted_steps


@functools.partial(jax.jit, static_argnames=("greedy",))
def _sample(logits_BV, key, temperature, top_p, *, greedy: bool):
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the smallest set whose mass reaches top_p
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    choice = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def generate_ids(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop_ids=(), use_cache: bool = True, positions=None,
                 block_positions=None, prefix_lens=None, pos_step=1, block_pos_step=0) -> list[list[int]]:
    """New ids for each prompt (up to ``max_new_tokens``; a stop id ends a row and is included).

    ``positions`` / ``block_positions``: per prompt lists (default 0..n-1 and 0); ``prefix_lens``: per
    prompt length of the bidirectional Part A (default 0, causal); new tokens take position
    ``last + pos_step`` and block position ``last + block_pos_step`` (per row values or scalars).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if not 0.0 < top_p <= 1.0 or temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    Tp = int(lens.max())
    S = Tp + max(int(max_new_tokens), 1)
    tok = np.zeros((B, S), np.int32)
    pos = np.zeros((B, S), np.int32)
    bpos = np.zeros((B, S), np.int32)
    for b, p in enumerate(prompts):
        n = len(p)
        tok[b, :n] = p
        pos[b, :n] = np.arange(n) if positions is None else positions[b]
        bpos[b, :n] = 0 if block_positions is None else block_positions[b]
    prefix = np.zeros(B, np.int32) if prefix_lens is None else np.asarray(prefix_lens, np.int32)
    pos_step = np.broadcast_to(np.asarray(pos_step, np.int32), (B,))
    bpos_step = np.broadcast_to(np.asarray(block_pos_step, np.int32), (B,))
    valid = np.arange(S)[None, :] < lens[:, None]
    cur = lens - 1  # slot of each row's last token
    key = jax.random.PRNGKey(seed)
    greedy = temperature == 0.0
    stop = np.asarray(list(stop_ids), np.int32)
    state, cached_step, full_step = jitted_steps(model)

    if use_cache:
        cache = init_cache(model.model_cfg, B, S)
        logits, cache = cached_step(state, cache, jnp.asarray(tok[:, :Tp]), jnp.asarray(pos[:, :Tp]),
                                       jnp.asarray(bpos[:, :Tp]), jnp.zeros(B, jnp.int32), jnp.asarray(valid),
                                       jnp.asarray(prefix), jnp.asarray(cur))
    out = [[] for _ in range(B)]
    done = np.zeros(B, bool)
    for t in range(max_new_tokens):
        if not use_cache:
            feats = {"tokens": tok, "positions": pos, "block_positions": bpos, "segment_ids": valid.astype(np.int32),
                     "bidirectional": (np.arange(S)[None, :] < prefix[:, None]).astype(np.int32)}
            logits = full_step(state, {k: jnp.asarray(v) for k, v in feats.items()}, jnp.asarray(cur))
        key, sub = jax.random.split(key)
        new = np.asarray(_sample(logits, sub, jnp.float32(temperature), jnp.float32(top_p), greedy=greedy))
        for b in range(B):
            if not done[b]:
                out[b].append(int(new[b]))
                done[b] = bool(stop.size) and int(new[b]) in stop
        if done.all() or t == max_new_tokens - 1:
            break
        slot = cur + 1
        rows = np.arange(B)
        tok[rows, slot] = new
        pos[rows, slot] = pos[rows, cur] + pos_step
        bpos[rows, slot] = bpos[rows, cur] + bpos_step
        valid[rows, slot] = True
        if use_cache:
            logits, cache = cached_step(state, cache, jnp.asarray(new[:, None]), jnp.asarray(pos[rows, slot][:, None]),
                                           jnp.asarray(bpos[rows, slot][:, None]), jnp.asarray(slot), jnp.asarray(valid),
                                           jnp.asarray(prefix), jnp.zeros(B, jnp.int32))
        cur = slot
    return out


def fill_blanks_ids(model, prompt: list[int], special: dict, *, max_new_tokens: int, **kw) -> tuple[list[int], list[list[int]]]:
    """GLM blank filling of one id prompt (Part A with mask tokens): ``(Part A, [span per mask])``.

    Masks are filled left to right; blank ``k`` is generated after ``<sop>`` at the position of its
    mask, with block positions 1, 2, ..., seeing Part A bidirectionally and the earlier spans causally.
    """
    masks = [i for i, t in enumerate(prompt) if t in (special["[MASK]"], special["[sMASK]"], special["[gMASK]"])]
    sop, eop = special["<sop>"], special["<eop>"]
    seq, pos, bpos = list(prompt), list(range(len(prompt))), [0] * len(prompt)
    spans = []
    for m in masks:
        seq += [sop]
        pos += [m]
        bpos += [1]
        new = generate_ids(model, [seq], max_new_tokens=max_new_tokens, stop_ids=(eop,), positions=[pos],
                           block_positions=[bpos], prefix_lens=[len(prompt)], pos_step=0, block_pos_step=1, **kw)[0]
        span = new[:-1] if new and new[-1] == eop else new
        spans.append(span)
        seq += new if new and new[-1] == eop else new + [eop]
        pos += [m] * (len(seq) - len(pos))
        bpos += list(range(2, 2 + len(seq) - len(bpos)))
    return list(prompt), spans


def generate(model, prompts, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, use_cache: bool = True):
    """Continue each prompt; a prompt with ``[MASK]``/``[sMASK]``/``[gMASK]`` has its blanks filled.

    ``prompts``: a list of strings (then a list of strings comes back: the continuation, or for a
    prompt with masks the prompt with every mask replaced by its span) or of id lists (then lists of new
    ids, no blank filling). Causal prompts of different lengths are decoded together in one batch.
    """
    kw = dict(temperature=temperature, top_p=top_p, seed=seed, use_cache=use_cache)
    if not prompts:
        return []
    if not isinstance(prompts[0], str):
        return generate_ids(model, [list(map(int, p)) for p in prompts], max_new_tokens=max_new_tokens, **kw)
    tk = model.get_tokenizer()
    encoded = [tk.encode(p) for p in prompts]
    mask_ids = {tk.special["[MASK]"], tk.special["[sMASK]"], tk.special["[gMASK]"]}
    results: list[str | None] = [None] * len(prompts)
    causal = [i for i, ids in enumerate(encoded) if not mask_ids & set(ids)]
    if causal:
        new = generate_ids(model, [encoded[i] for i in causal], max_new_tokens=max_new_tokens,
                           stop_ids=(tk.eos,), **kw)
        for i, ids in zip(causal, new):
            results[i] = tk.decode(ids)
    for i, ids in enumerate(encoded):
        if results[i] is None:
            part_a, spans = fill_blanks_ids(model, ids, tk.special, max_new_tokens=max_new_tokens, **kw)
            pieces, k = [], 0
            for t in part_a:
                if t in mask_ids:
                    pieces.append(tk.decode(spans[k]))
                    k += 1
                else:
                    pieces.append(None)
            text, run = [], []
            for t, piece in zip(part_a, pieces):
                if piece is None:
                    run.append(t)
                else:
                    text.append(tk.decode(run))
                    run = []
                    text.append(piece)
            text.append(tk.decode(run))
            results[i] = "".join(text)
    return results
