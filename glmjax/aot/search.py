"""When a config does not fit its slice: find one that does, by compiling candidates.

Order (cheapest change to the run first, cumulative): the vocab-chunked loss (exact, costs ~nothing),
``remat=full``, all data parallelism as fsdp; then the per-chip batch halved with those knobs until it
fits (``mode="batch"`` only halves the batch, keeping every other knob, and starts at the batch
that the failed compile's memory, extrapolated linearly, predicts under ``fill`` of HBM). Each candidate is one real
compile, so the search is capped at ``max_compiles``.
"""
from __future__ import annotations

import copy

from glmjax.aot.compile import compile_report
from glmjax.config import ConfigError, apply_override, resolve_mesh_axes, resolve_mesh_shape


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


def candidates(cfg, chips: int, mode: str = "auto", start_batch: int | None = None):
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
    data, fsdp, expert, _ = resolve_mesh_axes(c, chips)
    dp = data * fsdp * expert * int(c.optimizer.grad_accum_steps)
    batch = int(c.batch_size) // 2
    if start_batch is not None:
        batch = min(batch, start_batch)
    while batch >= dp and batch % dp == 0:
        yield {**knobs, "batch_size": batch}
        batch //= 2


def predicted_batch(report: dict, hbm: int, fill: float, dp: int) -> int | None:
    """Largest batch (a power-of-two fraction of the failing one, a multiple of ``dp``) whose memory,
    extrapolated linearly in the batch from ``report``, stays under ``fill * hbm``. Skips candidates
    that cannot fit (and compiles near the limit, which XLA makes slow by rematerialising)."""
    b = report["per_chip_bytes"]
    if b["temp"] is None or b["temp"] <= 0:
        return None
    fixed = b["arguments"] - 7 * 4 * report["batch_size"] * report["seq_len"] / report["chips"]
    per_seq = (b["total"] - fixed) / report["batch_size"]
    batch = report["batch_size"] // 2
    while batch >= dp and fixed + per_seq * batch > fill * hbm:
        batch //= 2
    return batch if batch >= dp and batch % dp == 0 else None


def suggest(cfg, topo, devices, *, mode: str = "auto", max_compiles: int = 6, progress=None,
            failed: dict | None = None, fill: float = 0.9):
    """The first candidate that fits: ``{"overrides": {...}, "per_chip_bytes": ...}``, or None.
    ``failed`` (the report of ``cfg`` itself) lets ``mode="batch"`` start at the predicted batch."""
    tried = 0
    start = None
    if mode == "batch" and failed is not None:
        data, fsdp, expert, _ = resolve_mesh_axes(cfg, topo.chips)
        start = predicted_batch(failed, topo.hbm_bytes, fill,
                                data * fsdp * expert * int(cfg.optimizer.grad_accum_steps))
    for overrides in candidates(cfg, topo.chips, mode, start):
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
