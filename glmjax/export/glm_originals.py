"""The released GLM-130B and ChatGLM-6B checkpoint layouts: import into glmjax and export back.

``glm130b``: a SwissArmyTransformer checkpoint directory, ``mp_rank_XX_model_states.pt`` files (one per
model-parallel rank, each ``{"module": state_dict}``; a ``latest`` file may name the step folder holding
them). The shape comes from ``--config`` (``configs/glm130b.py``): the checkpoint has no config file.

``chatglm``: the Hugging Face ChatGLM-6B remote-code layout (``config.json`` with ``model_type`` chatglm and
``position_encoding_2d``; ``pytorch_model*.bin`` or ``*.safetensors``).

Both use the same names (``transformer.`` prefix; ChatGLM-6B adds ``lm_head.weight``):

==========================================================  ===========================================
released                                                    glmjax
==========================================================  ===========================================
word_embeddings.weight [V, D]                                embed
layers.0.input_layernorm                                     embed_norm (model.embedding_norm=True)
layers.i.attention.query_key_value [H*3*hd, D] (per head     attn.wq / wk / wv [D, H, hd], bq / bk / bv
  ``[q_h; k_h; v_h]``), bias [H*3*hd]
layers.i.attention.dense [D, H*hd], bias [D]                 attn.wo [H, hd, D], attn.bo
layers.i.post_attention_layernorm                            layers.i.attn_norm
layers.i.mlp.dense_h_to_4h [2F, D] (GLM-130B ``[value;       mlp.wi [D, 2, F] (glu_order=value_first) or
  gate]``) or [F, D] (ChatGLM-6B), bias                        [D, F] (mlp=gelu), mlp.bi
layers.i.mlp.dense_4h_to_h [D, F], bias [D]                  mlp.wo [F, D], mlp.bo
layers.(i+1).input_layernorm / final_layernorm (last i)      layers.i.mlp_norm (model.final_norm=False)
lm_head.weight [V, D] (ChatGLM-6B; tied unless config says)  lm_head [D, V] when untied
==========================================================  ===========================================

The released block ``a = LN_in(h); m = LN_post(alpha*a + attn(a)); h = alpha*m + mlp(m)`` with a final
LN is glmjax's deepnorm block with the norms relabelled as above. Rotary is split-halves
(``rope_style=half``) in both: GLM-130B 1D over all of head_dim, ChatGLM-6B 2D, half of head_dim per stream.

Model-parallel ranks (GLM-130B) merge, and export splits into ``mp`` ranks, as SwissArmyTransformer splits
them (:mod:`glmjax.export.sat_mp`): column-parallel tensors (embeddings, query_key_value, dense_h_to_4h)
along dim 0 — dense_h_to_4h half by half, each rank holding ``[value_r; gate_r]`` — row-parallel weights
(attention.dense, dense_4h_to_h) along dim 1, the rest (norms, row-parallel biases) replicated (rank 0's
copy). ChatGLM2/3-6B is its own layout: :mod:`glmjax.export.chatglm2`.
"""
from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

# the architecture knobs each layout fixes (the shapes come from --config or config.json)
GLM130B_KNOBS = dict(norm="deepnorm", mlp="geglu", gelu="erf", glu_order="value_first", qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True, embedding_norm=True, final_norm=False, rope_2d=False,
                     rope_style="half", partial_rotary_factor=1.0, tie_embeddings=True)
CHATGLM_KNOBS = dict(norm="deepnorm", mlp="gelu", gelu="tanh", glu_order="gate_first", qkv_bias=True,
                     attn_out_bias=True, mlp_bias=True, embedding_norm=True, final_norm=False, rope_2d=True,
                     rope_style="half", partial_rotary_factor=0.5)

RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def _err(message: str):
    from glmjax.export.from_hf import ImportError_

    return ImportError_(message)


def _torch_load(path: str) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (pickle errors differ across torch versions)
        raise _err(f"{path} cannot be read as tensors only ({type(e).__name__}: {str(e).splitlines()[0]}): "
                   f"re-save it as torch.save({{'module': state_dict}}, path) with tensors only") from None


def _numpy(t) -> np.ndarray:
    return t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)


def sat_rank_files(model_dir: str) -> list[str]:
    """The ``mp_rank_XX_model_states.pt`` files of a SwissArmyTransformer checkpoint, by rank."""
    d = os.path.expanduser(model_dir)
    latest = os.path.join(d, "latest")
    if os.path.isfile(latest):
        d = os.path.join(d, open(latest).read().strip())
    files = [f for f in glob.glob(os.path.join(d, "mp_rank_*_model_states.pt")) if RANK_FILE.search(f)]
    files.sort(key=lambda f: int(RANK_FILE.search(f).group(1)))
    ranks = [int(RANK_FILE.search(f).group(1)) for f in files]
    if ranks != list(range(len(ranks))):
        raise _err(f"--model={model_dir}: model-parallel ranks {ranks} are not 0..{len(ranks) - 1}: "
                   f"every mp_rank_XX_model_states.pt file of the checkpoint is needed")
    return files


class SatGetter:
    """``get(name)`` over the merged model-parallel ranks of a GLM-130B (SwissArmyTransformer) checkpoint."""

    def __init__(self, model_dir: str, glu: bool = True):
        files = sat_rank_files(model_dir)
        if not files:
            raise _err(f"--model={model_dir} has no mp_rank_XX_model_states.pt files (the GLM-130B layout)")
        self.model_dir, self.glu = model_dir, glu
        self.ranks = []
        for f in files:
            state = _torch_load(f)
            if not isinstance(state, dict) or "module" not in state:
                raise _err(f"{f} is not a SwissArmyTransformer checkpoint: expected {{'module': state_dict}}")
            self.ranks.append(state["module"])
        self.names = set(self.ranks[0])

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise _err(f"--model={self.model_dir} lacks the tensor {name!r}: it is not a GLM-130B checkpoint of "
                       f"this --config (wrong --layout or num_layers?)")
        parts = [r[name] for r in self.ranks]
        if len(parts) == 1:
            return _numpy(parts[0])
        from glmjax.export.sat_mp import merge

        return merge(name, [_numpy(p) for p in parts], glu=self.glu)


class TorchBinGetter:
    """``get(name)`` over Hugging Face ``pytorch_model*.bin`` files (or safetensors when there are any)."""

    def __init__(self, model_dir: str):
        d = os.path.expanduser(model_dir)
        self.model_dir = model_dir
        if glob.glob(os.path.join(d, "*.safetensors")):
            from glmjax.export.from_hf import safetensors_getter

            self._get = safetensors_getter(model_dir)
            from safetensors import safe_open

            self.names = set()
            for f in glob.glob(os.path.join(d, "*.safetensors")):
                with safe_open(f, framework="np") as h:
                    self.names.update(h.keys())
            return
        files = sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
        if not files:
            raise _err(f"--model={model_dir} has no pytorch_model*.bin or *.safetensors weights")
        self.state = {}
        for f in files:
            self.state.update(_torch_load(f))
        self.names = set(self.state)
        self._get = lambda n: _numpy(self.state[n])

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise _err(f"--model={self.model_dir} lacks the tensor {name!r}: the weights do not match config.json")
        return self._get(name)


def _shape_checked(get, m, source: str, keys: str | None = None, fix: str | None = None):
    """``need(name, shape)``: the tensor, or an error naming it when its shape disagrees with the config.
    ``keys`` spells the shape keys as ``source`` names them; ``fix`` says what to do."""
    keys = keys or (f"num_layers={m.num_layers}, hidden_size={m.hidden_size}, num_heads={m.num_heads}, "
                    f"head_dim={m.head_dim}, mlp_dim={m.mlp_dim}, vocab_size={m.vocab_size}")
    fix = fix or "pass the config this checkpoint was trained with (or override the differing model.* keys)"

    def need(name, shape):
        x = get(name)
        if tuple(x.shape) != tuple(shape):
            raise _err(f"tensor {name!r} has shape {tuple(x.shape)} but {source} ({keys}) implies "
                       f"{tuple(shape)}: {fix}")
        return x
    return need


def _norm(need, name, D):
    return {"scale": need(name + ".weight", (D,)), "bias": need(name + ".bias", (D,))}


def original_params(get, m, *, source: str = "--config") -> dict:
    """glmjax params (layers as a list) from the released names (GLM-130B or ChatGLM-6B)."""
    D, H, hd, F, V, L = m.hidden_size, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size, m.num_layers
    if m.num_kv_heads != H:
        raise _err(f"model.num_kv_heads={m.num_kv_heads} but the released GLM layouts are multi-head "
                   f"(num_kv_heads = num_heads = {H}): set --config.model.num_kv_heads={H}")
    need = _shape_checked(get, m, source)
    names = getattr(get, "names", None)
    extra = f"transformer.layers.{L}.input_layernorm.weight"
    if names is not None and extra in names:
        n = 1 + max(int(k.split(".")[2]) for k in names if k.startswith("transformer.layers."))
        raise _err(f"the checkpoint has {n} layers but {source} has model.num_layers={L}: "
                   f"pass --config.model.num_layers={n}")
    t = "transformer."
    out = {"embed": need(t + "word_embeddings.weight", (V, D)),
           "embed_norm": _norm(need, t + "layers.0.input_layernorm", D)}
    gated = m.mlp != "gelu"
    layers = []
    for i in range(L):
        p = f"{t}layers.{i}."
        qkv = need(p + "attention.query_key_value.weight", (3 * H * hd, D)).reshape(H, 3, hd, D)
        qkv_b = need(p + "attention.query_key_value.bias", (3 * H * hd,)).reshape(H, 3, hd)
        attn = {"wq": qkv[:, 0].transpose(2, 0, 1), "wk": qkv[:, 1].transpose(2, 0, 1),
                "wv": qkv[:, 2].transpose(2, 0, 1), "bq": qkv_b[:, 0], "bk": qkv_b[:, 1], "bv": qkv_b[:, 2],
                "wo": need(p + "attention.dense.weight", (D, H * hd)).T.reshape(H, hd, D),
                "bo": need(p + "attention.dense.bias", (D,))}
        width = 2 * F if gated else F
        wi = need(p + "mlp.dense_h_to_4h.weight", (width, D)).T
        bi = need(p + "mlp.dense_h_to_4h.bias", (width,))
        mlp = {"wi": wi.reshape(D, 2, F) if gated else wi, "bi": bi.reshape(2, F) if gated else bi,
               "wo": need(p + "mlp.dense_4h_to_h.weight", (D, F)).T, "bo": need(p + "mlp.dense_4h_to_h.bias", (D,))}
        nxt = f"{t}layers.{i + 1}.input_layernorm" if i + 1 < L else t + "final_layernorm"
        layers.append({"attn": attn, "mlp": mlp, "attn_norm": _norm(need, p + "post_attention_layernorm", D),
                       "mlp_norm": _norm(need, nxt, D)})
    out["layers"] = layers
    if not m.tie_embeddings:
        out["lm_head"] = need("lm_head.weight", (V, D)).T
    return out


def original_state_dict(params, m) -> dict[str, np.ndarray]:
    """The released names (float32 NumPy, one model-parallel rank) from glmjax ``params``: the inverse of
    :func:`original_params` (``lm_head.weight`` only when untied)."""
    from glmjax.export.hf_mapping import tree_reader

    read = tree_reader(params, m)
    D, H, hd, L = m.hidden_size, m.num_heads, m.head_dim, m.num_layers
    f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    t = "transformer."
    out = {t + "word_embeddings.weight": f32(read(("embed",), None))}

    def norm(name, path, layer):
        out[name + ".weight"] = f32(read((*path, "scale"), layer))
        out[name + ".bias"] = f32(read((*path, "bias"), layer))

    norm(t + "layers.0.input_layernorm", ("embed_norm",), None)
    for i in range(L):
        p = f"{t}layers.{i}."
        g = lambda *path, i=i: np.asarray(read(("layers", *path), i), np.float32)  # noqa: E731
        qkv = np.stack([g("attn", w).transpose(1, 2, 0) for w in ("wq", "wk", "wv")], axis=1)  # [H, 3, hd, D]
        out[p + "attention.query_key_value.weight"] = f32(qkv.reshape(3 * H * hd, D))
        out[p + "attention.query_key_value.bias"] = f32(np.stack([g("attn", b) for b in ("bq", "bk", "bv")], 1)
                                                        .reshape(-1))
        out[p + "attention.dense.weight"] = f32(g("attn", "wo").reshape(H * hd, D).T)
        out[p + "attention.dense.bias"] = f32(g("attn", "bo"))
        out[p + "mlp.dense_h_to_4h.weight"] = f32(g("mlp", "wi").reshape(D, -1).T)
        out[p + "mlp.dense_h_to_4h.bias"] = f32(g("mlp", "bi").reshape(-1))
        out[p + "mlp.dense_4h_to_h.weight"] = f32(g("mlp", "wo").T)
        out[p + "mlp.dense_4h_to_h.bias"] = f32(g("mlp", "bo"))
        norm(p + "post_attention_layernorm", ("layers", "attn_norm"), i)
        nxt = f"{t}layers.{i + 1}.input_layernorm" if i + 1 < L else t + "final_layernorm"
        norm(nxt, ("layers", "mlp_norm"), i)
    if not m.tie_embeddings:
        out["lm_head.weight"] = f32(read(("lm_head",), None).T)
    return out


def check_original_knobs(m, knobs: dict, layout: str) -> None:
    """Raise ``ValueError`` unless ``m`` has the architecture knobs of the released ``layout``."""
    bad = [f"model.{k}={m.get(k)!r} (the layout has {v!r})" for k, v in knobs.items() if m.get(k) != v]
    if bad:
        raise ValueError(f"this model is not the {layout} architecture, so it does not map onto that layout: "
                         + "; ".join(bad))


# ----------------------------------------------------------------------------------------- layouts


def glm130b_model_config(config: dict) -> dict:
    return dict(GLM130B_KNOBS)


def chatglm_model_config(config: dict) -> dict:
    if "multi_query_attention" in config or "padded_vocab_size" in config:
        raise _err("this is a ChatGLM2/3-6B checkpoint (multi-query attention, RMSNorm, SwiGLU): import it with "
                   "--layout=chatglm2 (or without --layout); --layout=chatglm is ChatGLM-6B, the first version")
    if not config.get("position_encoding_2d", True):
        raise _err("config.json has position_encoding_2d=false: glmjax's chatglm layout is ChatGLM-6B's 2D rotary")
    D, H = int(config["hidden_size"]), int(config["num_attention_heads"])
    return dict(CHATGLM_KNOBS, num_layers=int(config["num_layers"]), hidden_size=D, num_heads=H,
                num_kv_heads=H, head_dim=D // H, mlp_dim=int(config.get("inner_hidden_size") or 4 * D),
                vocab_size=int(config["vocab_size"]), norm_eps=float(config.get("layernorm_epsilon", 1e-5)),
                tie_embeddings=bool(config.get("tie_word_embeddings", True)))


def original_layout(m) -> str | None:
    """``glm130b`` / ``chatglm`` when model config ``m`` has that released architecture, else None."""
    for name, knobs in (("glm130b", GLM130B_KNOBS), ("chatglm", CHATGLM_KNOBS)):
        if all(m.get(k) == v for k, v in knobs.items()) and m.num_kv_heads == m.num_heads:
            return name
    return None


def export_original(reader, out: str, layout: str, *, dtype: str = "float32", mp: int = 1) -> dict:
    """Write the checkpoint of ``reader`` (a ``CheckpointReader``) in the released ``layout`` to ``out``:
    glm130b as SwissArmyTransformer ``mp`` model-parallel ranks (``OUT/latest``, ``OUT/<step>/mp_rank_XX_
    model_states.pt``, split as :mod:`glmjax.export.sat_mp` says), chatglm / chatglm2 as config.json +
    pytorch_model.bin. The whole state dict is built in host memory (fine to ChatGLM-6B scale; for
    GLM-130B that is ~520 GB in float32)."""
    import time

    from glmjax.export import chatglm2

    t0 = time.perf_counter()
    m = reader.cfg.model
    knobs = {"glm130b": GLM130B_KNOBS, "chatglm": CHATGLM_KNOBS, "chatglm2": chatglm2.CHATGLM2_KNOBS}[layout]
    check_original_knobs(m, knobs, layout)
    if mp != 1 and layout != "glm130b":
        raise ValueError(f"--mp={mp}: only the glm130b layout is split into model-parallel ranks "
                         f"({layout} is one Hugging Face checkpoint); drop --mp")
    if layout == "glm130b":
        from glmjax.export.sat_mp import check_mp

        check_mp(m, mp)
    if layout != "chatglm2" and m.num_kv_heads != m.num_heads:
        raise ValueError(f"model.num_kv_heads={m.num_kv_heads} != num_heads={m.num_heads}: the {layout} layout "
                         f"is multi-head attention")
    params = reader.read_tree()
    sd = chatglm2.chatglm2_state_dict(params, m) if layout == "chatglm2" else original_state_dict(params, m)
    if layout == "chatglm" and m.tie_embeddings:  # the released files store the tied copy too
        sd["lm_head.weight"] = sd["transformer.word_embeddings.weight"]
    os.makedirs(out, exist_ok=True)
    if layout == "glm130b":
        from glmjax.export.sat_mp import split_state_dict

        paths = write_sat_checkpoint(split_state_dict(sd, mp, glu=m.mlp != "gelu"), out, step=reader.step,
                                     dtype=dtype)
    else:
        sd = _cast(sd, dtype)
        paths = [chatglm2.write_chatglm2_checkpoint(sd, m, out, seq_length=reader.cfg.seq_len)
                 if layout == "chatglm2" else write_chatglm_checkpoint(sd, m, out)]
    size = sum(os.path.getsize(p) for p in paths)
    return {"format": layout, "step": reader.step, "out": out, "shards": len(paths), "bytes": size,
            "seconds": time.perf_counter() - t0}


def _cast(sd: dict, dtype: str) -> dict:
    if dtype != "bfloat16":
        return sd
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16) for k, v in sd.items()}


def _tensor(v):
    import torch

    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))


def write_sat_checkpoint(ranks, out_dir: str, *, step: int = 0, dtype: str = "float32") -> list[str]:
    """A SwissArmyTransformer checkpoint directory from rank state dicts (NumPy; a single dict = one rank):
    ``out_dir/latest`` naming the step and ``out_dir/<step>/mp_rank_XX_model_states.pt`` per rank, each
    ``{"module": state_dict, "iteration": step}`` (what SAT's ``load_checkpoint`` reads)."""
    import torch

    if isinstance(ranks, dict):
        ranks = [ranks]
    step_dir = os.path.join(out_dir, str(int(step)))
    os.makedirs(step_dir, exist_ok=True)
    paths = []
    for r, sd in enumerate(ranks):
        path = os.path.join(step_dir, f"mp_rank_{r:02d}_model_states.pt")
        torch.save({"module": {k: _tensor(v) for k, v in _cast(sd, dtype).items()}, "iteration": int(step)}, path)
        paths.append(path)
    with open(os.path.join(out_dir, "latest"), "w") as f:
        f.write(f"{int(step)}\n")
    return paths


def write_chatglm_checkpoint(state_dict: dict, m, out_dir: str) -> str:
    """A ChatGLM-6B-layout directory (config.json + pytorch_model.bin) from NumPy arrays."""
    import torch

    os.makedirs(out_dir, exist_ok=True)
    config = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": int(m.hidden_size),
              "num_attention_heads": int(m.num_heads), "num_layers": int(m.num_layers),
              "inner_hidden_size": int(m.mlp_dim), "vocab_size": int(m.vocab_size),
              "layernorm_epsilon": float(m.norm_eps), "position_encoding_2d": True,
              "tie_word_embeddings": bool(m.tie_embeddings)}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    path = os.path.join(out_dir, "pytorch_model.bin")
    torch.save({k: _tensor(v) for k, v in state_dict.items()}, path)
    return path
