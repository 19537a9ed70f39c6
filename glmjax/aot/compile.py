"""Compile the real train / eval step for a TPU slice ahead of time and read what it needs per chip.

``compile_report(cfg, topology)`` lowers ``make_train_step`` (and ``make_eval_step``) against
abstract, sharded arguments on abstract TPU devices, compiles them with the real XLA:TPU / Mosaic
compilers, and returns per-chip memory (``memory_analysis``), the fit verdict against the chip's
HBM, compile time and the collectives of the compiled program. No TPU and no real arrays needed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from glmjax.aot.topology import Topology, abstract_devices
from glmjax.config import validate
from glmjax.scaling.flops import flops_per_token
from glmjax.sharding import batch_sharding, make_mesh

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2,
                "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")


@dataclasses.dataclass
class StepReport:
    fits: bool
    arguments: int  # per chip, bytes (parameters + optimizer state + batch)
    temp: int  # per chip: activations, gradients, workspace
    output: int
    alias: int  # outputs written in place of donated arguments (the new state)
    total: int  # arguments + output - alias + temp
    compile_seconds: float
    collectives: dict  # name -> {"count", "bytes"}
    error: str | None = None  # compiler's out-of-memory message when it refused the program
    xla_flops: float | None = None


def collectives_of(hlo_text: str) -> dict:
    """Counts and result bytes of the collectives in compiled HLO text (async ``-start`` ops counted
    once, by their largest result). An op in a scanned layer body appears once but runs per layer."""
    out = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if not m:
            continue
        sizes = [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                 for d, dims in _SHAPE.findall(m.group(1))]
        nbytes = (max(sizes) if m.group(3) else sum(sizes)) if sizes else 0
        out[m.group(2)]["count"] += 1
        out[m.group(2)]["bytes"] += nbytes
    return out


def mesh_for(cfg, topo: Topology, devices) -> Mesh:
    """The run's (data, fsdp, tensor) mesh on the slice(s), built by ``make_mesh`` (the training path).
    Multi-slice with ``mesh.dcn_data`` = ``mesh.dcn_fsdp`` = 1 (unset): the data axis spans the
    slices (``dcn_data`` = the slice count), everything else stays inside a slice."""
    validate(cfg, topo.chips)
    if topo.num_slices > 1 and int(cfg.mesh.get("dcn_data", 1)) * int(cfg.mesh.get("dcn_fsdp", 1)) == 1:
        cfg = cfg.copy_and_resolve_references()
        cfg.mesh.dcn_data = topo.num_slices
    return make_mesh(cfg, devices)


def _mesh_dict(mesh: Mesh) -> dict:
    """The mesh axes of the report; ``expert`` (MoE) only when it has more than one device."""
    return {k: v for k, v in mesh.shape.items() if k != "expert" or v > 1}


def abstract_batch(cfg, mesh: Mesh) -> dict:
    from glmjax.train.step import FEATURES

    shape = (int(cfg.batch_size), int(cfg.seq_len))
    sh = batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32, sharding=sh)
            for k in FEATURES}


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if isinstance(x.sharding, NamedSharding) else x.shape
        total += math.prod(shard) * np.dtype(x.dtype).itemsize
    return int(total)


def _oom_message(e: Exception) -> str | None:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "out of memory" in text.lower():
        return " ".join(text.split())[:600]
    return None


_UNITS = {None: 1, "": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes_in(msg: str, pattern: str) -> int | None:
    """A size XLA printed (HumanReadableNumBytes: 1024-based K/M/G) after ``pattern``."""
    m = re.search(pattern + r"\s*\(?([0-9.]+)\s*([KMGT]?)i?B?\)?", msg)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


def _compile(fn, args, hbm: int) -> StepReport:
    from pallas_kernels import compile_for

    t0 = time.perf_counter()
    try:
        with compile_for("tpu"):
            lowered = fn.lower(*args)
        compiled = lowered.compile()
    except Exception as e:
        msg = _oom_message(e)
        if msg is None:
            raise
        # The compiler refuses programs that exceed HBM; it names the temporaries it needed.
        temp = _bytes_in(msg, r"HLO temporaries") or -1
        arguments = per_chip_bytes(args)
        total = arguments + temp if temp >= 0 else -1
        empty = {c: {"count": 0, "bytes": 0} for c in COLLECTIVES}
        return StepReport(False, arguments, temp, -1, -1, total, time.perf_counter() - t0, empty, error=msg)
    seconds = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    args_b, temp, out, alias = (int(ma.argument_size_in_bytes), int(ma.temp_size_in_bytes),
                                int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes))
    total = args_b + out - alias + temp
    flops = None
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops")) if cost and "flops" in cost else None
    except Exception:  # cost analysis is optional information
        pass
    return StepReport(total <= hbm, args_b, temp, out, alias, total, seconds, collectives_of(compiled.as_text()),
                      xla_flops=flops)


def compile_report(cfg, topo: Topology, *, eval_step: bool = True, devices=None) -> dict:
    """Compile the train (and eval) step of ``cfg`` for ``topo``; a JSON-ready dict (see docs/tpu_aot.md)."""
    from glmjax.train.state import model_spec
    from glmjax.train.step import make_eval_step, make_train_step

    devices = abstract_devices(topo) if devices is None else devices
    mesh = mesh_for(cfg, topo, devices)  # validates the config first: errors before any compile
    hbm = topo.hbm_bytes
    spec = model_spec(cfg, mesh)
    batch = abstract_batch(cfg, mesh)
    train = _compile(make_train_step(cfg, spec, mesh), (spec.abstract_state, batch), hbm)
    evals = _compile(make_eval_step(cfg, spec, mesh), (spec.abstract_state.params, batch), hbm) \
        if eval_step else None
    params = per_chip_bytes(spec.abstract_state.params)
    fpt = flops_per_token(cfg.model, int(cfg.seq_len))
    tokens = int(cfg.batch_size) * int(cfg.seq_len)
    report = {
        "topology": str(topo), "generation": topo.generation.name, "chips": topo.chips,
        "num_slices": topo.num_slices, "mesh": _mesh_dict(mesh), "batch_size": int(cfg.batch_size),
        "seq_len": int(cfg.seq_len), "per_chip_batch": int(cfg.batch_size) / (mesh.shape["data"] * mesh.shape["fsdp"]
                                                                      * mesh.shape.get("expert", 1)),
        "fits": train.fits and (evals is None or evals.fits), "hbm_bytes": hbm,
        "per_chip_bytes": {"arguments": train.arguments, "temp": train.temp, "total": train.total,
                           "parameters": params, "optimizer_state": per_chip_bytes(spec.abstract_state.opt_state),
                           "gradients_estimate": params, "output": train.output, "alias": train.alias},
        "margin_bytes": hbm - train.total if train.total >= 0 else None,
        "compile_seconds": train.compile_seconds + (evals.compile_seconds if evals else 0.0),
        "train_compile_seconds": train.compile_seconds,
        "collectives": train.collectives,
        "flops_per_step": fpt.train * tokens, "flops_per_chip_per_step": fpt.train * tokens / topo.chips,
        "xla_flops_per_chip": train.xla_flops,
        "error": train.error,
    }
    if evals is not None:
        report["eval"] = {"fits": evals.fits, "total": evals.total, "temp": evals.temp,
                          "compile_seconds": evals.compile_seconds, "error": evals.error}
    return report
