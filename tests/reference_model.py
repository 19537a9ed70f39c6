"""An independent float64 NumPy implementation of the GLM forward pass, written from DESIGN.md §3,
used only by tests. Rotary uses complex numbers; the mask is built with explicit loops."""
from __future__ import annotations

import numpy as np


def mask_loops(seg, bidir, causal=True):
    B, T = seg.shape
    m = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                same = seg[b, i] == seg[b, j] and seg[b, j] != 0
                m[b, i, j] = same and (not causal or j <= i or bool(bidir[b, j]))
    return m


def attention_ref(q, k, v, mask):
    """q [B,T,H,D], k/v [B,S,K,D], mask [B,T,S] -> [B,T,H,D]; rows with no visible key give 0."""
    B, T, H, D = q.shape
    K = k.shape[2]
    out = np.zeros((B, T, H, D))
    for h in range(H):
        kh = h // (H // K)
        s = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / np.sqrt(D)
        s = np.where(mask, s, -np.inf)
        mx = np.max(s, axis=-1, keepdims=True)
        mx = np.where(np.isfinite(mx), mx, 0)
        e = np.where(mask, np.exp(s - mx), 0)
        den = e.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", e / np.where(den == 0, 1, den), v[:, :, kh])
    return out


def rope_ref(x, pos, theta, style="interleaved"):
    """Rotate the last dim of x [B,T,H,R] by pos [B,T] (complex form): pairs (x[2i], x[2i+1]) when
    ``interleaved``, (x[i], x[i+R/2]) when ``half``."""
    R = x.shape[-1]
    freqs = theta ** (-np.arange(0, R, 2) / R)
    re, im = (x[..., 0::2], x[..., 1::2]) if style == "interleaved" else (x[..., :R // 2], x[..., R // 2:])
    z = (re + 1j * im) * np.exp(1j * pos[:, :, None, None] * freqs)
    out = np.empty_like(x)
    if style == "interleaved":
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    else:
        out[..., :R // 2], out[..., R // 2:] = z.real, z.imag
    return out


def norm_ref(x, p, rms, eps):
    if rms:
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * p["scale"]
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def gelu(x):
    from math import erf
    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def forward_ref(params, m, feats):
    """Logits [B,T,V] of model config ``m`` with pure-dict ``params`` (stacked or per-layer)."""
    p = _to_np(params)
    tokens, pos = feats["tokens"], feats["positions"].astype(np.float64)
    bpos = feats["block_positions"].astype(np.float64)
    mask = mask_loops(feats["segment_ids"], feats["bidirectional"])
    rms = m.norm == "rmsnorm_pre"
    alpha = 1.0 if rms else np.sqrt(2.0 * m.num_layers)
    r = int(round(m.head_dim * m.get("partial_rotary_factor", 0.5)))
    style = m.get("rope_style", "interleaved")
    x = p["embed"][tokens]
    for layer in range(m.num_layers):
        lp = _layer(p["layers"], layer)
        a = lp["attn"]

        def attn(h):
            q = np.einsum("btd,dhk->bthk", h, a["wq"])
            k = np.einsum("btd,dhk->bthk", h, a["wk"])
            v = np.einsum("btd,dhk->bthk", h, a["wv"])
            if m.qkv_bias:
                q, k, v = q + a["bq"], k + a["bk"], v + a["bv"]

            def rot(t):
                parts = [rope_ref(t[..., :r], pos, m.rope_theta, style)]
                if m.rope_2d:
                    parts.append(rope_ref(t[..., r:2 * r], bpos, m.rope_theta, style))
                return np.concatenate([*parts, t[..., len(parts) * r:]], -1)

            o = attention_ref(rot(q), rot(k), v, mask)
            return np.einsum("bthk,hkd->btd", o, a["wo"])

        def mlp(h):
            g = np.einsum("btd,dcf->btcf", h, lp["mlp"]["wi"])
            act = g[:, :, 0] / (1 + np.exp(-g[:, :, 0])) if m.mlp == "swiglu" else gelu(g[:, :, 0])
            return np.einsum("btf,fd->btd", act * g[:, :, 1], lp["mlp"]["wo"])

        if rms:
            x = x + attn(norm_ref(x, lp["attn_norm"], True, m.norm_eps))
            x = x + mlp(norm_ref(x, lp["mlp_norm"], True, m.norm_eps))
        else:
            x = norm_ref(alpha * x + attn(x), lp["attn_norm"], False, m.norm_eps)
            x = norm_ref(alpha * x + mlp(x), lp["mlp_norm"], False, m.norm_eps)
    x = norm_ref(x, p["final_norm"], rms, m.norm_eps)
    head = p["embed"].T if m.tie_embeddings else p["lm_head"]
    return x @ head


def _to_np(tree):
    if isinstance(tree, dict):
        return {k: _to_np(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def _layer(layers, i):
    if 0 in layers or "0" in layers:
        return layers[i] if i in layers else layers[str(i)]
    return _index(layers, i)


def _index(tree, i):
    return {k: _index(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]
