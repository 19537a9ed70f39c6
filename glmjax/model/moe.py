"""Mixture of Experts MLP of GLM-4.5 (transformers ``glm4_moe``), dropless, with expert parallelism.

Router (float32): ``scores = sigmoid(x @ gate)``; the choice uses ``scores + correction_bias`` (the bias
never enters the output, nor the gradient); group-limited: experts form ``n_group`` groups, a group is
scored by the sum of its two best biased scores and a token chooses its ``experts_per_token`` experts
among its ``topk_group`` best groups; the chosen (unbiased) scores are optionally normalised to sum 1
and scaled by ``routed_scaling_factor``. Output = weighted sum of the chosen SwiGLU experts + the shared
experts (one SwiGLU of width ``expert_mlp_dim * num_shared_experts``, on every token).

Compute paths (``model.moe.impl``): ``ragged`` sorts the (token, expert) assignments by expert and runs
two grouped matmuls (``jax.lax.ragged_dot``): no capacity, no token dropped, empty experts cost nothing;
``dense`` runs every expert on every token and masks (the reference for tests). With ``mesh.expert > 1``
the experts are split over the ``expert`` mesh axis and, inside ``shard_map``, every assignment travels
to its expert's device and back with ``all_to_all``. The buffer per destination holds the worst case
(``local tokens * min(top-k, local experts)`` rows), so nothing is ever dropped.

Weights: ``wi [experts, embed, 2, expert_mlp]`` (index 0 gate, 1 up), ``wo [experts, expert_mlp, embed]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from glmjax.model.layers import GatedMLP, activation, dtype_of, param
from glmjax.sharding import batch_axes

STAT_KEYS = ("load", "entropy", "aux_loss")


def route(x_ND, gate_DE, bias_E, *, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
          scaling: float):
    """(weights [N, k] float32, expert ids [N, k] int32, sigmoid scores [N, E]) as glm4_moe routes."""
    scores = jax.nn.sigmoid(jnp.dot(x_ND.astype(jnp.float32), gate_DE.astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST))
    choice = scores + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
    N, E = scores.shape
    if n_group > 1:
        group_score = jax.lax.top_k(choice.reshape(N, n_group, E // n_group), 2)[0].sum(-1)  # [N, G]
        _, group_idx = jax.lax.top_k(group_score, topk_group)
        keep_G = jnp.zeros((N, n_group), bool).at[jnp.arange(N)[:, None], group_idx].set(True)
        choice = jnp.where(jnp.repeat(keep_G, E // n_group, axis=1), choice, -jnp.inf)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(choice), top_k)
    weights = jnp.take_along_axis(scores, idx, axis=1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, idx.astype(jnp.int32), scores


def expert_ffn(x_RD, ids_R, wi_EDCF, wo_EFD, act):
    """Row ``r`` through expert ``ids[r]`` (SwiGLU); ids equal to ``E`` are padding and give zeros.

    Rows are sorted by expert and multiplied with two grouped matmuls (``ragged_dot``)."""
    E, D, _, F = wi_EDCF.shape
    order = jnp.argsort(ids_R, stable=True)
    sizes = jnp.bincount(ids_R, length=E).astype(jnp.int32)  # padding (== E) is not counted
    h = jax.lax.ragged_dot(x_RD[order], wi_EDCF.reshape(E, D, 2 * F), sizes)
    h = act(h[:, :F]) * h[:, F:]
    y = jax.lax.ragged_dot(h, wo_EFD, sizes)
    return jnp.zeros_like(y).at[order].set(y, unique_indices=True)


def combine(y_NKD, w_NK):
    return jnp.einsum("nkd,nk->nd", y_NKD.astype(jnp.float32), w_NK)


def moe_ragged(x_ND, idx_NK, w_NK, wi, wo, act):
    """Dropless routed experts on one device: grouped matmuls over the N*k assignments."""
    N, K = idx_NK.shape
    y = expert_ffn(jnp.repeat(x_ND, K, axis=0), idx_NK.reshape(-1), wi, wo, act)
    return combine(y.reshape(N, K, -1), w_NK)


def moe_dense(x_ND, idx_NK, w_NK, wi, wo, act):
    """Reference: every expert on every token, weighted by the (mostly zero) dense gate matrix."""
    N, E = x_ND.shape[0], wi.shape[0]
    h = jnp.einsum("nd,edcf->necf", x_ND, wi)
    y = jnp.einsum("nef,efd->ned", act(h[:, :, 0]) * h[:, :, 1], wo)
    gate_NE = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_NK].add(w_NK)
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), gate_NE)


def _live(axes, size, mesh):
    live = tuple(a for a in axes if mesh.shape.get(a, 1) > 1)
    n = 1
    for a in live:
        n *= mesh.shape[a]
    return (live if len(live) > 1 else live[0]) if live and size % n == 0 else None


def moe_expert_parallel(x_BTD, idx_BTK, w_BTK, wi, wo, act, mesh):
    """Routed experts split over the ``expert`` mesh axis; assignments move by all-to-all.

    Per device (inside ``shard_map``): its N local tokens make N*k assignments; each goes to slot
    ``dest * C + rank`` of a send buffer (``C = N * min(k, local experts)``: the worst case, so dropless),
    one ``all_to_all`` delivers every slot to its expert's device, the grouped matmuls run there, and a
    second ``all_to_all`` brings the results back to the same slots. ``expert_mlp`` may be split over
    ``tensor`` (partial sums, one ``psum`` at the end)."""
    ep = mesh.shape["expert"]
    E, D, _, F = wi.shape
    El = E // ep
    bspec = _live(batch_axes(mesh), x_BTD.shape[0], mesh)
    t = _live(("tensor",), F, mesh)
    row = P(bspec, None, None)

    def local(x, idx, w, wi_l, wo_l):
        B, T, _ = x.shape
        K = idx.shape[-1]
        N = B * T
        C = N * min(K, El)
        idx, w = idx.reshape(N * K), w.reshape(N, K)
        dest, local_expert = idx // El, idx % El
        order = jnp.argsort(idx, stable=True)  # by destination, then by local expert
        counts = jnp.bincount(dest, length=ep)
        start = jnp.cumsum(counts) - counts
        sorted_dest = dest[order]
        slot_sorted = sorted_dest * C + (jnp.arange(N * K) - start[sorted_dest])
        slot = jnp.zeros((N * K,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
        rows = jnp.repeat(x.reshape(N, D), K, axis=0)
        send_x = jnp.zeros((ep * C, D), x.dtype).at[slot].set(rows, unique_indices=True)
        send_e = jnp.full((ep * C,), El, jnp.int32).at[slot].set(local_expert, unique_indices=True)
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
        recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True)
        y = expert_ffn(recv_x, recv_e, wi_l, wo_l, act)
        back = jax.lax.all_to_all(y, "expert", 0, 0, tiled=True)
        out = combine(back[slot].reshape(N, K, D), w)
        if t is not None:
            out = jax.lax.psum(out, t)
        return out.reshape(B, T, D)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(row, row, row, P("expert", None, None, t),
                                                   P("expert", t, None)), out_specs=row)
    return fn(x_BTD, idx_BTK, w_BTK, wi, wo)


def routing_stats(idx_NK, scores_NE, valid_N, batch: int):
    """Per-layer statistics over real tokens: expert load (assignment counts), mean router entropy
    (of the scores normalised over experts, nats) and the sequence-level balance loss
    ``sum_i f_i P_i`` averaged over sequences (``f_i = E / (k T) * count_i``, ``P_i`` = mean share)."""
    N, K = idx_NK.shape
    E = scores_NE.shape[-1]
    v = valid_N.astype(jnp.float32)
    onehot_NE = jnp.zeros((N, E), jnp.float32).at[jnp.arange(N)[:, None], idx_NK].add(1.0)
    load = jnp.sum(onehot_NE * v[:, None], axis=0)
    p = scores_NE / jnp.sum(scores_NE, axis=-1, keepdims=True)
    ent = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1)
    entropy = jnp.sum(ent * v) / jnp.maximum(jnp.sum(v), 1.0)
    vb = v.reshape(batch, -1)
    tokens_b = jnp.maximum(jnp.sum(vb, axis=1), 1.0)
    f_bE = E / (K * tokens_b[:, None]) * jnp.sum((onehot_NE * v[:, None]).reshape(batch, -1, E), axis=1)
    p_bE = jnp.sum((p * v[:, None]).reshape(batch, -1, E), axis=1) / tokens_b[:, None]
    aux = jnp.mean(jnp.sum(f_bE * p_bE, axis=-1))
    return {"load": load, "entropy": entropy, "aux_loss": aux}


class Router(nnx.Module):
    """Router weights (float32, as glm4_moe keeps them) and the score-correction bias (no gradient; moved
    by :func:`update_correction_bias` after each step)."""

    def __init__(self, cfg, rngs: nnx.Rngs):
        E = cfg.moe.num_experts
        self.gate = param(rngs, (cfg.hidden_size, E), ("embed", None), std=cfg.init_std, dtype=jnp.float32)
        self.bias = param(rngs, (E,), (None,), std=0, dtype=jnp.float32)


class MoE(nnx.Module):
    """Routed experts + shared experts; returns ``(output, routing stats)``."""

    def __init__(self, cfg, rngs: nnx.Rngs, *, stds: dict):
        e = cfg.moe
        pd = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        E, D, F = e.num_experts, cfg.hidden_size, e.expert_mlp_dim
        self.router = Router(cfg, rngs)
        self.wi = param(rngs, (E, D, 2, F), ("experts", "embed", "gate_up", "expert_mlp"), std=cfg.init_std,
                        dtype=pd)
        self.wo = param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), std=stds["mlp_wo"], dtype=pd)
        if e.num_shared_experts:
            self.shared = GatedMLP(cfg, rngs, stds=stds, mlp_dim=F * e.num_shared_experts)

    def __call__(self, x_BTD, feats, mesh=None):
        cfg, e, dt = self.cfg, self.cfg.moe, self.dtype
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        w, idx, scores = route(x_ND, self.router.gate[...], self.router.bias[...], top_k=e.experts_per_token,
                               n_group=e.n_group, topk_group=e.topk_group, norm_topk_prob=e.norm_topk_prob,
                               scaling=e.routed_scaling_factor)
        wi, wo, act = self.wi[...].astype(dt), self.wo[...].astype(dt), activation(cfg)
        if mesh is not None and mesh.shape.get("expert", 1) > 1:
            K = idx.shape[-1]
            out = moe_expert_parallel(x_BTD, idx.reshape(B, T, K), w.reshape(B, T, K), wi, wo, act, mesh)
            out = out.reshape(B * T, D)
        elif e.impl == "dense":
            out = moe_dense(x_ND, idx, w, wi, wo, act)
        else:
            out = moe_ragged(x_ND, idx, w, wi, wo, act)
        out = out.astype(dt).reshape(B, T, D)
        if e.num_shared_experts:
            out = out + self.shared(x_BTD)
        seg = feats.get("segment_ids")
        valid = jnp.ones((B * T,), bool) if seg is None else (seg.reshape(-1) != 0)
        return out, routing_stats(idx, scores, valid, B)


def moe_metrics(stats) -> dict:
    """Scalars for metrics.jsonl from the stacked per-layer stats ``{load [L, E], entropy [L], ...}``."""
    load = stats["load"]
    imbalance = jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
    return {"moe_imbalance": jnp.max(imbalance), "moe_imbalance_mean": jnp.mean(imbalance),
            "router_entropy": jnp.mean(stats["entropy"]), "moe_aux_loss": jnp.mean(stats["aux_loss"])}


def update_correction_bias(params: dict, load_LE, rate: float) -> dict:
    """Aux-loss-free balancing: ``bias += rate * sign(mean load - load)`` per layer and expert."""
    delta = rate * jnp.sign(jnp.mean(load_LE, axis=-1, keepdims=True) - load_LE)
    layers = params["moe_layers"]
    if "mlp" in layers:  # scanned: one stacked [L, E] bias
        new = dict(layers)
        new["mlp"] = _with_bias(layers["mlp"], layers["mlp"]["router"]["bias"] + delta)
    else:  # nnx.List: {0: {...}, 1: {...}}
        new = {k: {**v, "mlp": _with_bias(v["mlp"], v["mlp"]["router"]["bias"] + delta[i])}
               for i, (k, v) in enumerate(sorted(layers.items(), key=lambda kv: int(kv[0])))}
    return {**params, "moe_layers": new}


def _with_bias(mlp: dict, bias) -> dict:
    return {**mlp, "router": {**mlp["router"], "bias": bias.astype(mlp["router"]["bias"].dtype)}}
