"""Import a Hugging Face checkpoint into glmjax: the export map run backwards.

Library functions (the CLI ``tools/import_hf.py`` is a thin wrapper):

- :func:`detect_layout` says which source layout a directory is (``--layout``, else auto-detected):
  ``glm`` (native ``GlmForCausalLM``), ``glmjax`` (our own remote-code export), ``chatglm`` (Hugging Face
  ChatGLM-6B remote code), ``chatglm2`` (ChatGLM2/3-6B remote code, ``chatglm2.py``), ``glm130b`` (the released GLM-130B SwissArmyTransformer checkpoint,
  ``mp_rank_XX_model_states.pt``; its shape comes from ``--config``). See ``glm_originals.py`` for the last two.
- :func:`read_hf_config` reads ``config.json``; an architecture glmjax does not import is an error.
- :func:`model_config_from_hf` gives the glmjax ``model.*`` values for it.
- :func:`params_from_hf` maps a source state dict (``get(name) -> np.ndarray``) to glmjax parameters.
- :func:`import_hf` writes a workdir: the run config (with ``data.tokenizer`` = the model's own
  tokenizer) and a step-0 checkpoint that ``python -m glmjax.train --workdir=DIR`` resumes from.

``glm4_moe`` (``Glm4MoeForCausalLM``: GLM-4.5, 4.5-Air, 4.6) is the MoE layout (``hf_moe_mapping.py``).
A new source layout is one more ``LAYOUTS`` entry: a config function and a params function (and a
getter in :func:`tensor_getter` when its weights are not safetensors).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np

log = logging.getLogger("glmjax.export")


class ImportError_(ValueError):
    """The Hugging Face directory cannot be imported; the message says why and what to do."""


def read_hf_config(hf_dir: str) -> tuple[str, dict]:
    path = os.path.join(os.path.expanduser(hf_dir), "config.json")
    if not os.path.isfile(path):
        raise ImportError_(f"--model={hf_dir} has no config.json: pass a Hugging Face model directory "
                           f"(config.json + *.safetensors)")
    config = json.load(open(path))
    kind = config.get("model_type")
    if kind not in LAYOUTS or kind in NEEDS_CONFIG:
        raise ImportError_(f"--model={hf_dir} is a {kind!r} model ({config.get('architectures')}); glmjax imports "
                           f"model_type glm (GlmForCausalLM, e.g. GLM-4-9B), glm4_moe (Glm4MoeForCausalLM, GLM-4.5), "
                           f"glmjax (a glmjax remote-code export) "
                           f"and chatglm (ChatGLM-6B, ChatGLM2/3-6B), and GLM-130B checkpoints (--layout=glm130b); known "
                           f"layouts: {', '.join(sorted(LAYOUTS))}")
    return kind, config


def _glm_model_config(config: dict) -> dict:
    rope = config.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    factor = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5)))
    problems = []
    if factor != 0.5:
        problems.append(f"partial_rotary_factor={factor} (glmjax's 1D rotary turns half of head_dim)")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config.get('hidden_act')!r} (glmjax's SwiGLU uses silu)")
    if (rope.get("rope_type") or "default") != "default":
        problems.append(f"rope_type={rope.get('rope_type')!r} (only plain rotary is implemented)")
    if problems:
        raise ImportError_("this GLM cannot be represented by glmjax: " + "; ".join(problems))
    H = int(config["num_attention_heads"])
    D = int(config["hidden_size"])
    return dict(num_layers=int(config["num_hidden_layers"]), hidden_size=D, num_heads=H,
                num_kv_heads=int(config.get("num_key_value_heads") or H),
                head_dim=int(config.get("head_dim") or D // H), mlp_dim=int(config["intermediate_size"]),
                vocab_size=int(config["vocab_size"]), norm="rmsnorm_pre", norm_eps=float(config.get("rms_norm_eps", 1e-5)),
                mlp="swiglu", rope_2d=False, rope_theta=theta, qkv_bias=bool(config.get("attention_bias", True)),
                tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _glmjax_model_config(config: dict) -> dict:
    """The exported ``model`` config; nested sections (``moe``) as dotted keys."""
    def flat(tree, prefix=""):
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    return flat(dict(config["glmjax_model"]))


def _glm_params(get, m) -> dict:
    """glmjax params (layers as a list) from GlmForCausalLM tensor names."""
    D, H, K, hd, F = m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    layers = []
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        attn = {"wq": get(p + "self_attn.q_proj.weight").T.reshape(D, H, hd),
                "wk": get(p + "self_attn.k_proj.weight").T.reshape(D, K, hd),
                "wv": get(p + "self_attn.v_proj.weight").T.reshape(D, K, hd),
                "wo": get(p + "self_attn.o_proj.weight").T.reshape(H, hd, D)}
        if m.qkv_bias:
            attn.update(bq=get(p + "self_attn.q_proj.bias").reshape(H, hd),
                        bk=get(p + "self_attn.k_proj.bias").reshape(K, hd),
                        bv=get(p + "self_attn.v_proj.bias").reshape(K, hd))
        layers.append({"attn": attn,
                       "mlp": {"wi": get(p + "mlp.gate_up_proj.weight").T.reshape(D, 2, F),
                               "wo": get(p + "mlp.down_proj.weight").T},
                       "attn_norm": {"scale": get(p + "input_layernorm.weight")},
                       "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")}})
    out = {"embed": get("model.embed_tokens.weight"), "final_norm": {"scale": get("model.norm.weight")},
           "layers": layers}
    if not m.tie_embeddings:
        out["lm_head"] = get("lm_head.weight").T
    return out


def _glmjax_params(get, m) -> dict:
    """glmjax params (layers as a list) from a glmjax remote-code export (glmjax names per layer)."""
    from glmjax.train.state import abstract_params

    cfg = m.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.scan_layers = False
    _, abstract, _ = abstract_params(cfg)

    def build(tree, prefix):
        return {k: build(v, f"{prefix}{k}.") if isinstance(v, dict) else get(f"{prefix}{k}")
                for k, v in tree.items()}
    out = build({k: v for k, v in abstract.items() if k != "layers"}, "")
    out["layers"] = [build(abstract["layers"][i], f"layers.{i}.") for i in range(m.num_layers)]
    return out


from glmjax.export import glm_originals as _orig  # noqa: E402

LAYOUTS = {"glm": (_glm_model_config, _glm_params), "glmjax": (_glmjax_model_config, _glmjax_params),
           "chatglm": (_orig.chatglm_model_config,
                       lambda get, m: _orig.original_params(get, m, source="config.json")),
           "glm130b": (_orig.glm130b_model_config, _orig.original_params)}

from glmjax.export import chatglm2 as _chatglm2  # noqa: E402  (ChatGLM2/3-6B: model_type chatglm, v2 keys)

LAYOUTS["chatglm2"] = (_chatglm2.chatglm2_model_config, _chatglm2.chatglm2_params)

from glmjax.export import hf_moe_mapping as _moe  # noqa: E402  (GLM-4.5 MoE: Glm4MoeForCausalLM)

LAYOUTS["glm4_moe"] = (_moe.glm4_moe_model_config, _moe.glm4_moe_params)
NEEDS_CONFIG = ("glm130b",)  # layouts whose checkpoint has no config file: --config gives the shape


def detect_layout(model_dir: str, layout: str | None = None) -> tuple[str, dict]:
    """``(layout, config.json as a dict or {})`` of ``model_dir``; ``layout`` (``--layout``) or auto-detected."""
    if layout is not None and layout not in LAYOUTS:
        raise ImportError_(f"unknown --layout={layout!r}: known layouts are {', '.join(sorted(LAYOUTS))}")
    d = os.path.expanduser(model_dir)
    if not os.path.isdir(d):
        raise ImportError_(f"--model={model_dir} is not a directory: pass the checkpoint directory")
    if layout == "glm130b" or (layout is None and _orig.sat_rank_files(d)):
        if not _orig.sat_rank_files(d):
            raise ImportError_(f"--model={model_dir} has no mp_rank_XX_model_states.pt files: it is not a "
                               f"GLM-130B (SwissArmyTransformer) checkpoint; known layouts: "
                               f"{', '.join(sorted(LAYOUTS))}")
        return "glm130b", {}
    kind, config = read_hf_config(model_dir)
    if kind == "chatglm" and _chatglm2.is_chatglm2(config):
        kind = "chatglm2"
    if layout is not None and kind != layout:
        raise ImportError_(f"--layout={layout} but --model={model_dir} is a {kind!r} model (config.json "
                           f"model_type): drop --layout to auto-detect, or pass --layout={kind}")
    return kind, config


def tensor_getter(kind: str, model_dir: str, model_cfg):
    """``get(name) -> np.ndarray`` (with a ``names`` set where known) over the checkpoint's weights."""
    if kind == "glm130b":
        return _orig.SatGetter(model_dir, glu=model_cfg.mlp != "gelu")
    if kind in ("chatglm", "chatglm2"):
        return _orig.TorchBinGetter(model_dir)
    return safetensors_getter(model_dir)


def model_config_from_hf(kind: str, config: dict) -> dict:
    return LAYOUTS[kind][0](config)


def params_from_hf(kind: str, get, model_cfg) -> dict:
    """glmjax parameter pure dict (float32 NumPy; stacked when ``model.scan_layers``) from ``get(name)``."""
    def as_f32(name):
        return np.asarray(get(name), np.float32)

    as_f32.names = getattr(get, "names", None)
    params = LAYOUTS[kind][1](as_f32, model_cfg)
    for stack in ("layers", "moe_layers"):  # moe_layers: the MoE blocks of glm4_moe
        if stack not in params:
            continue
        layers = params.pop(stack)
        if not layers:  # model.moe.first_dense_layers=0: no dense stack
            continue
        if model_cfg.scan_layers:
            import jax

            params[stack] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
        else:
            params[stack] = dict(enumerate(layers))
    return params


def safetensors_getter(hf_dir: str):
    """``get(name)`` over the directory's safetensors files (one tensor read at a time, memory-mapped)."""
    from safetensors import safe_open

    hf_dir = os.path.expanduser(hf_dir)
    files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    if not files:
        raise ImportError_(f"--model={hf_dir} has no *.safetensors weights (PyTorch .bin files are not read): "
                           f"re-save it with model.save_pretrained(dir, safe_serialization=True)")
    where = {}
    for f in files:
        with safe_open(os.path.join(hf_dir, f), framework="np") as h:
            for k in h.keys():
                where[k] = f

    def get(name):
        if name not in where:
            raise ImportError_(f"--model={hf_dir} lacks the tensor {name!r}: the weights do not match config.json")
        with safe_open(os.path.join(hf_dir, where[name]), framework="np") as h:
            x = h.get_tensor(name)
        return x.astype(np.float32) if x.dtype != np.float32 else x
    get.names = set(where)
    return get


def import_hf(hf_dir: str, workdir: str, *, config_path: str | None = None, overrides=(),
              layout: str | None = None) -> dict:
    """Write ``workdir`` (config + step-0 checkpoint) from the checkpoint at ``hf_dir`` (``layout``: one of
    ``LAYOUTS``, default auto-detected)."""
    import jax

    from glmjax.checkpoint import Checkpointer
    from glmjax.checkpoint.run_files import CHECKPOINT_DIR, step_dirs
    from glmjax.config import apply_override, base_config, load_config, validate
    from glmjax.sharding import make_mesh
    from glmjax.train.state import model_spec

    kind, config = detect_layout(hf_dir, layout)
    if kind in NEEDS_CONFIG and not config_path:
        raise ImportError_(f"a {kind} checkpoint has no config file, so --config must give its shape: e.g. "
                           f"--config=configs/{kind}.py (and --config.model.KEY=VALUE for a different size)")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    from etils import epath

    if step_dirs(epath.Path(workdir) / CHECKPOINT_DIR):
        raise ImportError_(f"--workdir={workdir} already holds checkpoints: import into a new directory")
    cfg = load_config(config_path) if config_path else base_config()
    try:
        values = model_config_from_hf(kind, config)
    except ValueError as e:
        raise ImportError_(f"this {kind} model cannot be represented by glmjax: {e}") from None
    for key, value in values.items():
        *parents, leaf = key.split(".")  # dotted: a nested section (model.moe.*)
        node = cfg.model
        for part in parents:
            node = node[part] if part in node else None
            if node is None:
                break
        if node is None or leaf not in node:
            raise ImportError_(f"the source model needs model.{key}={value!r}, which this glmjax does not have")
        node[leaf] = value
    tok = os.path.join(os.path.expanduser(hf_dir), "tokenizer.json")
    if os.path.isfile(tok):
        cfg.data.tokenizer = os.path.abspath(os.path.expanduser(hf_dir))
    for item in overrides:
        apply_override(cfg, item)
    if not os.path.isfile(tok) and not cfg.data.tokenizer:
        log.info("note: %s has no tokenizer.json, so the run's tokenizer is unset: pass "
                 "--config.data.tokenizer=PATH (a SentencePiece model or a Hugging Face tokenizer directory) "
                 "when training; the released GLM-130B tokenizer is icetk's", hf_dir)
    validate(cfg, jax.device_count())
    get = tensor_getter(kind, hf_dir, cfg.model)
    params = params_from_hf(kind, get, cfg.model)
    mesh = make_mesh(cfg)
    spec = model_spec(cfg, mesh)
    from glmjax.train.state import TrainState

    placed = jax.tree.map(lambda x, s: jax.device_put(x.astype(s.dtype), s.sharding), params, spec.abstract_state.params)
    opt = jax.jit(spec.tx.init, out_shardings=spec.shardings.opt_state)(placed)
    state = TrainState(step=jax.device_put(np.int32(0), spec.shardings.step), params=placed, opt_state=opt)
    with cfg.unlocked():
        cfg.checkpoint.async_save = False
    ckpt = Checkpointer(workdir, cfg)
    ckpt.save(0, state, fresh_data_state(cfg), force=True)
    ckpt.close()
    write_config_file(cfg, workdir)
    log.info("imported %s (%s) into %s as step 0", hf_dir, kind, workdir)
    return {"workdir": workdir, "kind": kind, "config": cfg}


CONFIG_FILE = "imported_config.py"


def write_config_file(cfg, workdir: str) -> str:
    """``WORKDIR/imported_config.py``: a config file giving this config, for ``--config=`` when resuming."""
    from glmjax.checkpoint import config_to_dict

    with open(os.path.join(workdir, "imported_config.json"), "w") as f:
        json.dump(config_to_dict(cfg), f, indent=2)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path, "w") as f:
        f.write('"""The config of a model imported by tools/import_hf.py (values in imported_config.json).\n\n'
                f'    python -m glmjax.train --config={path} --workdir={workdir}\n"""\n'
                "import json\nimport os\n\nfrom glmjax.export.reader import config_from_dict\n\n\n"
                "def get_config():\n    here = os.path.dirname(os.path.abspath(__file__))\n"
                "    return config_from_dict(json.load(open(os.path.join(here, 'imported_config.json'))))\n")
    return path


def fresh_data_state(cfg) -> dict:
    """The data-iterator state of a pipeline that has produced nothing yet (resume = start the data)."""
    from glmjax.data.streams import STATE_VERSION

    return dict(version=STATE_VERSION, split="train", batches=0, seed=int(cfg.seed), task=str(cfg.data.task),
                batch_size=int(cfg.batch_size), seq_len=int(cfg.seq_len), streams=int(cfg.data.get("streams", 0)),
                stream_states={})
