"""When a config does not fit its slice: find one that does, by compiling candidates.

Order (cheapest change to the run first, cumulative): the vocab-chunked loss (exact, costs ~nothing),
``remat=full``, all data parallelism as fsdp; then the per-chip batch halved with those knobs until it
fits (``mode="batch"`` only halves the batch, keeping every other knob). Each candidate is one real
compile, so the search is capped at ``max_compiles``.
"""
from __future__ import annotations

import copy

from glmjax.aot.compile import compile_report
from glmjax.config import ConfigError, apply_override, resolve_mesh_shape


def _with(cfg, overrides: dict):
    c = copy.deepcopy(cfg)
    for k, v in overrides.items():
        apply_override(c, f"{k}={v}")
    return c


def _loss_chunk(cfg) -> int:
    for c in (512, 256, 128, 64):
        if cfg.seq_len % c == 0 and c < cfg.seq_len:
            return c
    return 0


def candidates(cfg, chips: int, mode: str = "auto"):
    """Override dicts to try, in order."""
    knobs: dict = {}
    if mode == "auto":
        if not cfg.model.loss_chunk and _loss_chunk(cfg):
            knobs = {**knobs, "model.loss_chunk": _loss_chunk(cfg)}
            yield dict(knobs)
        if cfg.model.remat != "full":
            knobs = {**knobs, "model.remat": "full"}
            yield dict(knobs)
        data, fsdp, tensor = resolve_mesh_shape(cfg, chips)
        if data > 1 and cfg.mesh.data != 1:
            knobs = {**knobs, "mesh.data": 1, "mesh.fsdp": -1}
            yield dict(knobs)
    c = _with(cfg, knobs)
    data, fsdp, _ = resolve_mesh_shape(c, chips)
    dp = data * fsdp * int(c.optimizer.grad_accum_steps)
    batch = int(c.batch_size) // 2
    while batch >= dp and batch % dp == 0:
        yield {**knobs, "batch_size": batch}
        batch //= 2


def suggest(cfg, topo, devices, *, mode: str = "auto", max_compiles: int = 6, progress=None):
    """The first candidate that fits: ``{"overrides": {...}, "report": {...}}``, or None."""
    tried = 0
    for overrides in candidates(cfg, topo.chips, mode):
        if tried >= max_compiles:
            break
        tried += 1
        try:
            c = _with(cfg, overrides)
            report = compile_report(c, topo, eval_step=False, devices=devices)
        except ConfigError:
            continue
        if progress:
            progress(overrides, report)
        if report["fits"]:
            return {"overrides": overrides, "fits": True, "per_chip_bytes": report["per_chip_bytes"],
                    "per_chip_batch": report["per_chip_batch"], "compiles": tried,
                    "command_line": " ".join(f"--config.{k}={v}" for k, v in overrides.items())}
    return None


def largest_batch(cfg, topo, devices, *, max_doublings: int = 4, progress=None):
    """Double ``batch_size`` (which fits) while the train step still fits; the largest that fits."""
    best = int(cfg.batch_size)
    batch = int(cfg.batch_size)
    for _ in range(max_doublings):
        batch *= 2
        report = compile_report(_with(cfg, {"batch_size": batch}), topo, eval_step=False, devices=devices)
        if progress:
            progress({"batch_size": batch}, report)
        if not report["fits"]:
            break
        best = batch
    return best
