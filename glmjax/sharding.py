"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and large activations carry logical axis names (``embed``, ``heads``, ``kv_heads``, ``mlp``,
``vocab``, ``batch``, ``length``, ...). :data:`RULES` maps each name to mesh axes. Changing the
parallelism of a run is editing that table or the mesh shape in the config, never the model code.

A logical dimension whose size does not divide by its mesh axes is replicated instead (e.g. 2 kv heads
over ``tensor=8``): correct everywhere, and logged once by :func:`param_shardings`.
"""
from __future__ import annotations

import contextlib
import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.config import resolve_mesh_axes

MESH_AXES = ("data", "fsdp", "expert", "tensor")  # expert: MoE expert parallelism (mesh.expert, default 1)

# logical axis name -> mesh axes (None = replicated)
RULES: dict[str, tuple[str, ...] | str | None] = {
    "batch": ("data", "fsdp", "expert"),  # expert (size 1 unless MoE expert parallelism) splits the batch too
    "length": None,
    # the residual stream between blocks along length, with model.sequence_parallel: XLA all-gathers it
    # before attention / MLP and reduce-scatters after, so tensor parallelism shrinks activations too
    "residual_length": "tensor",
    # parameters: ZeRO-3 style, gathered per layer by XLA; with MoE expert parallelism the expert axis
    # shards the non-expert weights too (routed expert weights take it for "experts" first)
    "embed": ("fsdp", "expert"),
    "act_embed": None,  # activations' hidden dim
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "gate_up": None,
    "vocab": "tensor",
    "layers": None,
    "norm": None,
    "experts": "expert",  # MoE: routed expert weights [experts, ...]
    "expert_mlp": "tensor",
}

_ACTIVATION_MESH: list[Mesh] = []
log = logging.getLogger(__name__)


def make_mesh(cfg, devices=None) -> Mesh:
    """The ``(data, fsdp, expert, tensor)`` mesh of the config over ``devices`` (default: all devices).

    TPU (and GPU) devices are laid out by ``mesh_utils.create_device_mesh``, so that each mesh axis
    follows the physical torus; if the shape only fits by splitting a physical axis, that is done and
    logged (``allow_split_physical_axes``). A shape that cannot follow the topology is a
    ``ConfigError`` naming shapes that can -- never a silent fallback to row-major order. CPU devices
    (tests, fake devices) have no topology: they are taken process by process, in id order, so each
    host's devices are adjacent along the mesh (the one documented fallback).

    Multi-slice (devices with several ``slice_index`` values): ``mesh.dcn_data`` x ``mesh.dcn_fsdp``
    must equal the slice count; the data and fsdp axes then span that many slices over the data-centre
    network and the rest of each axis stays inside a slice (``create_hybrid_device_mesh``: per-slice
    ICI shape ``(data/dcn_data, fsdp/dcn_fsdp, tensor)`` x DCN shape ``(dcn_data, dcn_fsdp, 1)``).

    The expert axis (MoE, ``mesh.expert``) is carved out of the fsdp group of the topology-following
    ``(data, fsdp * expert, tensor)`` grid, expert innermost, so expert devices are neighbours (inside a
    slice); with ``mesh.expert=1`` the grid is exactly the three-axis one.
    """
    devices = jax.devices() if devices is None else list(devices)
    data, fsdp, expert, tensor = resolve_mesh_axes(cfg, len(devices))
    dcn = dcn_shape(cfg, (data, fsdp, tensor), devices)
    shape = (data, fsdp * expert, tensor)
    grid = device_grid(shape, devices) if dcn == (1, 1, 1) else hybrid_grid(shape, dcn, devices)
    return Mesh(grid.reshape(data, fsdp, expert, tensor), MESH_AXES)


def _slices(devices) -> dict:
    """slice_index -> its devices (devices without one, e.g. CPU, are one slice)."""
    out: dict = {}
    for d in devices:
        out.setdefault(getattr(d, "slice_index", 0) or 0, []).append(d)
    return out


def dcn_shape(cfg, shape, devices) -> tuple[int, int, int]:
    """``(dcn_data, dcn_fsdp, 1)`` checked against the devices' slices and the mesh shape (ConfigError with a fix)."""
    from glmjax.config import ConfigError

    dd, df = int(cfg.mesh.get("dcn_data", 1)), int(cfg.mesh.get("dcn_fsdp", 1))
    slices = _slices(devices)
    n = len(slices)
    data, fsdp, _ = shape
    if dd * df != n:
        if n == 1:
            raise ConfigError(f"mesh.dcn_data={dd} x mesh.dcn_fsdp={df} = {dd * df} slices, but these {len(devices)} "
                              f"devices are one slice: the dcn axes split the mesh between slices joined by the "
                              f"data-centre network. Fix: --config.mesh.dcn_data=1 --config.mesh.dcn_fsdp=1")
        data_fix = data if data % n == 0 else n
        raise ConfigError(f"these {len(devices)} devices are {n} slices (device.slice_index) but mesh.dcn_data={dd} x "
                          f"mesh.dcn_fsdp={df} = {dd * df}: the slices must tile the mesh's data/fsdp axes. Fix: e.g. "
                          f"--config.mesh.dcn_data={n} --config.mesh.dcn_fsdp=1 --config.mesh.data={data_fix} (data "
                          f"parallelism across slices; mesh.data a multiple of {n})")
    sizes = {len(v) for v in slices.values()}
    if len(sizes) > 1:
        raise ConfigError(f"the {n} slices hold different numbers of devices ({sorted(sizes)}): a mesh needs equal "
                          "slices. Fix: run on whole slices of one type")
    for axis, size, k in (("data", data, dd), ("fsdp", fsdp, df)):
        if size % k:
            raise ConfigError(f"mesh.{axis}={size} must be a multiple of the {k} slices it spans "
                              f"(mesh.dcn_{axis}={k}): each slice holds an equal part of the axis. Fix: "
                              f"--config.mesh.{axis}={k * max(1, size // k)} (or a multiple), adjusting the other "
                              f"axes so that the product stays {len(devices)}")
    return dd, df, 1


def hybrid_grid(shape, dcn, devices) -> np.ndarray:
    """The devices as a ``shape`` array: per-slice ICI mesh ``shape / dcn`` x DCN mesh ``dcn`` (see make_mesh)."""
    from jax.experimental import mesh_utils

    from glmjax.config import ConfigError

    ici = tuple(int(s) // int(d) for s, d in zip(shape, dcn))
    try:
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:
        err = e
    try:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        per_slice = len(devices) // int(np.prod(dcn))
        good = [c for c in _candidate_shapes(per_slice, ici)
                if _topology_grid(c, _slices(devices)[min(_slices(devices))], log_split=False)[0] is not None][:3]
        fixes = " or ".join(f"--config.mesh.data={d * dcn[0]} --config.mesh.fsdp={f * dcn[1]} --config.mesh.tensor={t}"
                            for d, f, t in good)
        raise ConfigError(
            f"per-slice mesh (data, fsdp, tensor)={ici} (mesh {tuple(shape)} over dcn {tuple(dcn)}) cannot follow "
            f"the physical topology of each slice's {per_slice} devices ({str(err).splitlines()[0][:200]}). Fix: "
            f"{'use a mesh that can, e.g. ' + fixes if fixes else 'run on whole slices'}") from None
    log.info("per-slice mesh %s splits a physical axis of the slice topology (%s)", ici, str(err).splitlines()[0])
    return grid


def device_grid(shape, devices) -> np.ndarray:
    """The devices as an array of ``shape`` (data, fsdp, tensor) that follows their topology; see make_mesh."""
    from glmjax.config import ConfigError

    shape = tuple(int(s) for s in shape)
    if devices[0].platform == "cpu":
        return np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)), dtype=object).reshape(shape)
    grid, err = _topology_grid(shape, devices)
    if grid is not None:
        return grid
    good = [s for s in _candidate_shapes(len(devices), shape) if _topology_grid(s, devices, log_split=False)[0]
            is not None][:3]
    fixes = " or ".join(f"--config.mesh.data={d} --config.mesh.fsdp={f} --config.mesh.tensor={t}" for d, f, t in good)
    fix = (f"use a mesh that can, e.g. {fixes}" if fixes else
           "no (data, fsdp, tensor) shape fits these devices: run on whole slices (all devices of each host)")
    raise ConfigError(
        f"mesh (data, fsdp, tensor)={shape} cannot follow the physical topology of these {len(devices)} "
        f"{devices[0].platform.upper()} devices ({err[:200]}), so it would not give each axis neighbouring "
        f"chips. Fix: {fix}")


def _topology_grid(shape, devices, log_split: bool = True):
    """``(grid, None)`` from ``create_device_mesh`` (splitting physical axes if needed), or ``(None, why)``."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices=devices), None
    except (ValueError, NotImplementedError, AssertionError) as e:
        err = e
    try:
        grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__
    if log_split:
        log.info("mesh %s splits a physical axis of the device topology (%s)", shape, str(err).splitlines()[0])
    return grid, None


def _candidate_shapes(n: int, wanted):
    """(data, fsdp, tensor) shapes over ``n`` devices, closest to ``wanted`` first (same tensor, then fsdp)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    shapes = [(n // (f * t), f, t) for t in divs for f in divs if n % (f * t) == 0]
    return sorted(shapes, key=lambda s: (s[2] != wanted[2], abs(np.log2(s[1]) - np.log2(wanted[1])), s))


def spec_for(axes, shape, mesh: Mesh, rules=None) -> P:
    """PartitionSpec for a value with logical ``axes``; dims that don't divide their mesh axes replicate."""
    rules = RULES if rules is None else rules
    spec, used = [], set()
    for name, size in zip(axes, shape):
        target = rules.get(name) if name is not None else None
        if target is None:
            spec.append(None)
            continue
        target = (target,) if isinstance(target, str) else tuple(target)
        target = tuple(a for a in target if a not in used and mesh.shape.get(a, 1) > 1)
        n = int(np.prod([mesh.shape[a] for a in target])) if target else 1
        if not target or size % n:
            spec.append(None)
            continue
        used.update(target)
        spec.append(target[0] if len(target) == 1 else target)
    return P(*spec)


def sharding_for(axes, shape, mesh: Mesh, rules=None) -> NamedSharding:
    return NamedSharding(mesh, spec_for(axes, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


@contextlib.contextmanager
def activation_mesh(mesh: Mesh):
    """Within this context, :func:`constrain` pins activations to ``mesh`` by their logical names."""
    _ACTIVATION_MESH.append(mesh)
    try:
        yield mesh
    finally:
        _ACTIVATION_MESH.pop()


def current_mesh() -> Mesh | None:
    return _ACTIVATION_MESH[-1] if _ACTIVATION_MESH else None


def constrain(x: jax.Array, axes) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`activation_mesh`."""
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, sharding_for(axes, x.shape, mesh))


def residual_axes(cfg_model) -> tuple[str, str, str]:
    """Logical axes of the residual stream ``[B, T, D]`` between blocks (sequence parallel or not)."""
    return ("batch", "residual_length" if cfg_model.get("sequence_parallel", False) else "length",
            "act_embed")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of input features ``[batch, length, ...]``."""
    return NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: data and fsdp, and expert when it has more than one device
    (so a dense run's batch sharding is exactly the three-axis one)."""
    return ("data", "fsdp") + (("expert",) if mesh.shape.get("expert", 1) > 1 else ())
