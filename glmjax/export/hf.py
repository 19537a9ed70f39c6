"""Export a glmjax checkpoint to a Hugging Face directory, streamed tensor by tensor.

``export(workdir, out, step=None, fmt="auto", dtype="float32", max_shard_size="5GB")``:

- ``hf``: GLM-4-style models (``rmsnorm_pre``, ``swiglu``, 1D rotary) as native ``GlmForCausalLM``
  (``model_type: glm``), loaded by ``AutoModelForCausalLM.from_pretrained(OUT)`` without remote code;
  GLM-4.5-style MoE models (``model.moe.num_experts > 0``) as ``Glm4MoeForCausalLM`` (``glm4_moe``), their
  only format (``hf_moe_mapping.py``).
- ``remote``: any glmjax model, as :mod:`glmjax.export.modeling_glmjax` (copied into OUT, named by
  ``auto_map``; ``trust_remote_code=True``), glmjax parameter names and shapes, one tensor per layer.
- ``glm130b`` / ``chatglm`` / ``chatglm2``: the released layouts (``glm_originals.py``, ``chatglm2.py``);
  ``glm130b`` into ``mp`` SwissArmyTransformer model-parallel ranks.
- ``auto``: the released GLM-130B / ChatGLM-6B layout for exactly those architectures, else ``hf`` when
  the model maps onto ``GlmForCausalLM`` (ChatGLM2/3's architecture too: ``chatglm2`` only when asked),
  else ``remote``.

Everything is written into ``OUT.tmp-<pid>`` and renamed to ``OUT`` at the end, so a failure leaves
nothing at ``OUT``. Every argument and the checkpoint are checked before any tensor is read.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

from glmjax.export import hf_mapping, hf_moe_mapping
from glmjax.moe_config import moe_layer_count
from glmjax.export.reader import CheckpointReader
from glmjax.export.safetensors_stream import parse_size, write_shards

log = logging.getLogger("glmjax.export")
ORIGINAL_FORMATS = ("glm130b", "chatglm", "chatglm2")  # the released layouts (glm_originals.py, chatglm2.py)
FORMATS = ("auto", "hf", "remote", *ORIGINAL_FORMATS)
REMOTE_FILE = os.path.join(os.path.dirname(__file__), "modeling_glmjax.py")


class ExportError(ValueError):
    """The export cannot be done as asked; the message says why and the fix."""


def layer_reader(reader: CheckpointReader):
    """``read(path, layer)`` over the checkpoint: one layer slice of a stacked tensor, or one listed layer."""
    scanned = bool(reader.cfg.model.scan_layers)

    def read(path, layer):
        if path[0] in ("layers", "moe_layers") and layer is not None:  # moe_layers: the MoE blocks
            if scanned:
                return reader.read(path, index=layer)
            return reader.read((path[0], str(layer), *path[1:]))
        return reader.read(path)
    return read


def remote_tensors(model_cfg, read):
    """``(name, shape, make)`` of the remote-code model: glmjax names, one tensor per layer."""
    from glmjax.train.state import abstract_params

    _, abstract, _ = abstract_params(model_cfg)
    out = []

    def walk(tree, prefix):
        for key in sorted(tree, key=str):
            value = tree[key]
            if isinstance(value, dict):
                walk(value, (*prefix, str(key)))
            else:
                out.append(((*prefix, str(key)), tuple(value.shape)))
    walk(abstract, ())
    tensors = []
    L = int(model_cfg.num_layers)
    for path, shape in out:
        if path[0] != "layers":
            tensors.append((".".join(path), shape, lambda p=path: read(p, None)))
        elif model_cfg.scan_layers:
            for i in range(L):
                tensors.append((".".join(("layers", str(i), *path[1:])), shape[1:], lambda p=path, i=i: read(p, i)))
        else:
            i = int(path[1])
            tensors.append((".".join(path), shape, lambda p=("layers", *path[2:]), i=i: read(p, i)))
    return sorted(tensors, key=lambda t: _order(t[0]))


def _tensor_major(name: str):
    """Order of writing: every layer of one parameter, then the next (the checkpoint stacks layers, so a
    stacked tensor's chunks are decoded once); the files' order does not matter to the loaders."""
    parts = name.split(".")
    if "layers" in parts:
        k = parts.index("layers")
        rest = parts[k + 2:]
        if "experts" in rest and rest[rest.index("experts") + 1].isdigit():  # MoE: every expert of a layer
            x = rest.index("experts") + 1  # in a row (they are slices of one stacked tensor)
            return (1, ".".join(rest[:x] + rest[x + 1:]), int(parts[k + 1]), int(rest[x]))
        return (1, ".".join(rest), int(parts[k + 1]), 0)
    return (0 if "embed" in name else 2, name, 0, 0)


def _order(name: str):
    parts = name.split(".")
    return (0 if parts[0] == "embed" else 1 if parts[0] == "layers" else 2,
            int(parts[1]) if parts[0] == "layers" else 0, name)


def _tokenizer_source(cfg, tokenizer: str | None) -> str:
    path = tokenizer or cfg.data.tokenizer
    if not path:
        from glmjax.data.vocab import cached_tokenizer_path

        path = cached_tokenizer_path(cfg)
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise ExportError(f"the run's tokenizer {path} does not exist on this machine, so it cannot be exported "
                          f"with the weights: pass --tokenizer=PATH (the SentencePiece .model or Hugging Face "
                          f"tokenizer directory the run trained with)")
    return path


def resolve_format(model_cfg, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"--format={fmt!r} is not one of {', '.join(FORMATS)}")
    if moe_layer_count(model_cfg):  # GLM-4.5-style MoE: native Glm4MoeForCausalLM only
        if fmt != "auto" and fmt != "hf":
            raise ExportError(f"--format={fmt}: a Mixture-of-Experts model (model.moe.num_experts="
                              f"{model_cfg.moe.num_experts}) exports only as Hugging Face Glm4MoeForCausalLM: "
                              f"use --format=hf (or auto)")
        try:
            hf_moe_mapping.check_moe_exportable(model_cfg)
        except ValueError as e:
            raise ExportError(f"--format=hf: {e}") from None
        return "hf"
    if fmt == "remote" or fmt in ORIGINAL_FORMATS:
        return fmt
    from glmjax.export.glm_originals import original_layout

    original = original_layout(model_cfg)
    if fmt == "auto" and original:  # an imported (or preset) released architecture goes back to its layout
        return original
    try:
        hf_mapping.check_exportable(model_cfg)
        return "hf"
    except ValueError as e:
        if fmt == "hf":
            raise ExportError(f"--format=hf: {e}") from None
        return "remote"


def export(workdir: str, out: str, *, step: int | None = None, fmt: str = "auto", dtype: str = "float32",
           max_shard_size="5GB", tokenizer: str | None = None, progress: bool = False, mp: int = 1) -> dict:
    """Export a checkpoint of ``workdir`` to ``out``; returns a summary dict (format, step, shards, bytes).
    ``mp``: model-parallel ranks of the ``glm130b`` layout."""
    if dtype not in ("float32", "bfloat16"):
        raise ExportError(f"--dtype={dtype!r} is not one of float32, bfloat16")
    try:
        parse_size(max_shard_size)
    except ValueError as e:
        raise ExportError(str(e)) from None
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out={out} already exists and is not empty: choose a new directory or delete it")
    reader = CheckpointReader(workdir, step)
    m = reader.cfg.model
    fmt = resolve_format(m, fmt)
    if mp != 1 and fmt != "glm130b":
        raise ExportError(f"--mp={mp}: only --format=glm130b is split into model-parallel ranks "
                          f"(this export is --format={fmt}); drop --mp")
    if fmt in ORIGINAL_FORMATS:
        from glmjax.export.glm_originals import export_original

        try:
            return export_original(reader, out, fmt, dtype=dtype, mp=mp)
        except ValueError as e:
            raise ExportError(f"--format={fmt}: {e}") from None
    if fmt == "remote":
        import importlib.util

        spec = importlib.util.spec_from_file_location("_glmjax_remote", REMOTE_FILE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        bad = mod.unsupported_knobs(dict(m))
        if bad:
            raise ExportError("the remote-code PyTorch GLM does not implement " + "; ".join(bad)
                              + ": add the knob to glmjax/export/modeling_glmjax.py (KNOBS)")
    tok_src = _tokenizer_source(reader.cfg, tokenizer)
    read = layer_reader(reader)
    if fmt == "hf":
        moe = moe_layer_count(m) > 0
        tensors = hf_moe_mapping.hf_moe_tensors(m, read) if moe else hf_mapping.hf_tensors(m, read)
    else:
        tensors = remote_tensors(m, read)
    tensors = sorted(tensors, key=lambda t: _tensor_major(t[0]))
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    t0 = time.perf_counter()
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tensors), desc="export", unit="tensor", dynamic_ncols=True)
        summary = write_shards(tensors, tmp, dtype=dtype, max_shard_size=max_shard_size,
                               progress=(lambda _: bar.update(1)) if bar else None,
                               metadata={"glmjax_step": str(reader.step)})
        if bar:
            bar.close()
        tensor_seconds = time.perf_counter() - t0
        special = _write_tokenizer(tok_src, tmp)
        _write_configs(reader, fmt, dtype, special, tmp)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    summary.update(format=fmt, step=reader.step, out=out, seconds=seconds, tensor_seconds=tensor_seconds)
    log.info("exported step %d of %s to %s (%s, %d shard(s), %.2f GB, %.1fs)", reader.step, reader.workdir, out,
             fmt, summary["shards"], summary["bytes"] / 1e9, seconds)
    return summary


def _write_tokenizer(src: str, out_dir: str) -> dict:
    """Write the tokenizer files; returns the special ids (``[MASK]`` ..., ``eos``, ``pad``)."""
    from glmjax.export.tokenizer import SPECIAL_TOKENS

    if os.path.isdir(src):  # a Hugging Face tokenizer directory (imported models): copy it
        for name in os.listdir(src):
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(os.path.join(src, name), out_dir)
        from tokenizers import Tokenizer

        tk = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
        special = {t: tk.token_to_id(t) for t in SPECIAL_TOKENS if tk.token_to_id(t) is not None}
        return special
    import sentencepiece as spm

    from glmjax.export.tokenizer import save_hf_tokenizer

    save_hf_tokenizer(src, out_dir)
    sp = spm.SentencePieceProcessor(model_file=src)
    special = {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS}
    special.update(eos=sp.eos_id(), pad=sp.pad_id())
    return special


def _write_configs(reader, fmt: str, dtype: str, special: dict, out_dir: str) -> None:
    from transformers import GenerationConfig

    from glmjax.checkpoint import config_to_dict

    m = reader.cfg.model
    eos, pad = special.get("eos"), special.get("pad")
    if fmt == "hf":
        from transformers import GlmConfig, Glm4MoeConfig

        moe = moe_layer_count(m) > 0
        kwargs = hf_moe_mapping.hf_moe_config(m) if moe else hf_mapping.hf_config(m)
        kwargs.update(eos_token_id=eos, pad_token_id=pad)
        config = (Glm4MoeConfig if moe else GlmConfig)(**kwargs)
        config.architectures = ["Glm4MoeForCausalLM" if moe else "GlmForCausalLM"]
        config.dtype = dtype
        config.save_pretrained(out_dir)
    else:
        shutil.copy(REMOTE_FILE, os.path.join(out_dir, "modeling_glmjax.py"))
        config = {"model_type": "glmjax", "architectures": ["GlmjaxForCausalLM"],
                  "auto_map": {"AutoConfig": "modeling_glmjax.GlmjaxConfig",
                               "AutoModelForCausalLM": "modeling_glmjax.GlmjaxForCausalLM"},
                  "glmjax_model": config_to_dict(m), "special_ids": special, "vocab_size": int(m.vocab_size),
                  "hidden_size": int(m.hidden_size), "num_hidden_layers": int(m.num_layers),
                  "num_attention_heads": int(m.num_heads), "tie_word_embeddings": bool(m.tie_embeddings),
                  "eos_token_id": eos, "pad_token_id": pad, "dtype": dtype}
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, do_sample=False).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(_model_card(reader, fmt, dtype))
    with open(os.path.join(out_dir, "glmjax_config.json"), "w") as f:
        json.dump(config_to_dict(reader.cfg), f, indent=2)


def _model_card(reader, fmt: str, dtype: str) -> str:
    m = reader.cfg.model
    knobs = ", ".join(f"{k}={m[k]}" for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                                              "mlp_dim", "vocab_size", "norm", "mlp", "rope_2d"))
    load = ("AutoModelForCausalLM.from_pretrained(path)" if fmt == "hf"
            else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return (f"---\nlibrary_name: transformers\ntags: [glm, glmjax]\n---\n# GLM exported by glmjax\n\n"
            f"- source: `{reader.workdir}`, checkpoint step **{reader.step}**\n- format: `{fmt}`, dtype `{dtype}`\n"
            f"- glmjax model config: {knobs}\n\n```python\nfrom transformers import AutoModelForCausalLM, "
            f"AutoTokenizer\nmodel = {load}\ntokenizer = AutoTokenizer.from_pretrained(path)\n```\n\n"
            f"The full run config is in `glmjax_config.json`.\n")
