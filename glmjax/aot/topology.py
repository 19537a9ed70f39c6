"""TPU slice names -> abstract TPU devices on a CPU host (``libtpu`` + ``jax.experimental.topologies``).

Accepted forms (case-insensitive):

* Cloud TPU accelerator types: ``v4-N`` and ``v5p-N`` (N = TensorCores, 2 per chip),
  ``v5litepod-N`` / ``v5e-N`` and ``v6e-N`` (N = chips);
* explicit chip grids ``GEN:AxBxC`` (``v5p:4x4x8``, ``v4:2x2x1``) or ``GEN:AxB`` (``v5e:4x8``);
* multi-slice: ``Sxv5p-128`` (S slices joined over the data-centre network), or ``num_slices=S``.

The chip grid for an accelerator type follows Cloud TPU's standard slice shapes: start from the
smallest host block and double the smallest dimension (the last one on ties), e.g. v5p-128 is
``4x4x4``, v5p-256 ``4x4x8``, v5litepod-32 ``4x8``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GIB = 1 << 30
# HBM per chip: v5p as the TPU compiler reports it ("available HBM (95.74G)"), the others their
# nominal 16 / 32 GiB. The compiler also refuses programs over this; the tool reports either way.


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # libtpu's name in "NAME:AxBxC"
    hbm_bytes: int  # per chip
    dims: int  # 2 (v5e, v6e) or 3 (v4, v5p) chip-grid dimensions
    cores_per_chip_in_name: int  # what the N of "v5p-N" counts per chip
    peak_bf16_flops: float  # per chip, for the report
    options: tuple = ()  # extra get_topology_desc kwargs


GENERATIONS = {
    "v4": Generation("v4", 32 * GIB, 3, 2, 275e12, (("chip_config_name", "megacore"),)),
    "v5e": Generation("v5e", 16 * GIB, 2, 1, 197e12),
    "v5p": Generation("v5p", int(95.74 * GIB), 3, 2, 459e12),
    "v6e": Generation("v6e", 32 * GIB, 2, 1, 918e12),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "v6lite": "v6e"}


class TopologyError(ValueError):
    """A topology string is wrong, or libtpu cannot be loaded. The message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: Generation
    grid: tuple[int, ...]  # chips per slice along each physical axis
    num_slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.grid)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    @property
    def libtpu_name(self) -> str:
        return f"{self.generation.name}:{'x'.join(map(str, self.grid))}"

    def __str__(self) -> str:
        one = self.libtpu_name
        return one if self.num_slices == 1 else f"{self.num_slices}x{one}"


def standard_grid(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's slice shape for ``chips`` chips (see the module docstring)."""
    if chips < 1 or chips & (chips - 1):
        raise TopologyError(f"{chips} chips is not a power of two: standard TPU slices have 1, 2, 4, 8, ... "
                            f"chips; give the grid explicitly instead, e.g. v5p:2x2x3")
    grid = [1] * dims
    if dims == 3 and chips >= 4:
        grid = [2, 2, 1]
    while math.prod(grid) < chips:
        smallest = min(grid)
        grid[max(i for i, g in enumerate(grid) if g == smallest)] *= 2
    return tuple(grid)


def parse_topology(text: str, num_slices: int = 1) -> Topology:
    s = text.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(v\d+[a-z]*)([-:])([0-9x]+)", s)
    known = "v4-8, v5p-128, v5litepod-16, v5e-16, v6e-64, v5p:4x4x8, v5e:4x8, 2xv5p-256"
    if not m:
        raise TopologyError(f"unknown topology {text!r}: write a Cloud TPU accelerator type or a chip grid, "
                            f"e.g. {known}")
    slices, gen_name, sep, rest = m.groups()
    gen_name = ALIASES.get(gen_name, gen_name)
    if gen_name not in GENERATIONS:
        raise TopologyError(f"unknown TPU generation {gen_name!r} in {text!r}: supported are "
                            f"{', '.join(GENERATIONS)} (v5litepod = v5e); e.g. {known}")
    gen = GENERATIONS[gen_name]
    if slices is not None and num_slices != 1 and int(slices) != num_slices:
        raise TopologyError(f"{text!r} says {slices} slices but num_slices={num_slices}: give it once")
    n_slices = int(slices) if slices is not None else num_slices
    if n_slices < 1:
        raise TopologyError(f"num_slices={n_slices} must be >= 1")
    if sep == "-":
        if not rest.isdigit() or int(rest) < 1:
            raise TopologyError(f"bad accelerator type {text!r}: the part after '-' is a core/chip count, "
                                f"e.g. {gen_name}-128")
        n = int(rest)
        per = gen.cores_per_chip_in_name
        if n % per:
            raise TopologyError(f"{text!r}: {gen_name}-N counts TensorCores ({per} per chip), so N must be a "
                                f"multiple of {per}, e.g. {gen_name}-{max(per, 8)}")
        grid = standard_grid(max(n // per, 1), gen.dims)
    else:
        parts = rest.split("x")
        if len(parts) != gen.dims or not all(p.isdigit() and int(p) > 0 for p in parts):
            example = "x".join(["2"] * gen.dims)
            raise TopologyError(f"bad chip grid {text!r}: {gen_name} slices are {gen.dims}-D, write "
                                f"{gen_name}:{example}")
        grid = tuple(int(p) for p in parts)
    return Topology(gen, grid, n_slices)


def require_libtpu() -> None:
    """Raise :class:`TopologyError` saying how to install libtpu when it is not importable."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        raise TopologyError("libtpu is not installed, so the TPU compiler is not available on this host: "
                            "install it with `pip install -e '.[test]'` (or `pip install \"jax[tpu]\"` "
                            "matching your jax version); no TPU is needed, the compiler runs on the CPU")


def _quiet_libtpu_env() -> None:
    # libtpu looks for a real TPU at start-up and complains on a CPU host; these make it stand down.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # compile-only use: several processes (tests, a background tool run) may load libtpu at once
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def abstract_devices(topo: Topology) -> list:
    """The slice's devices (compile-only: they run nothing), multi-slice with ``slice_index`` set."""
    require_libtpu()
    _quiet_libtpu_env()
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.libtpu_name,
                                            num_slices=topo.num_slices, **dict(topo.generation.options))
    except Exception as e:  # libtpu present but unusable, or a grid it rejects
        msg = str(e).splitlines()[0][:300]
        raise TopologyError(f"libtpu could not describe topology {topo} ({type(e).__name__}: {msg}); "
                            f"check the grid is a valid slice (e.g. v5p:2x2x1, v5p:4x4x8) and that libtpu "
                            f"matches jax (`pip install \"jax[tpu]==$(python -c 'import jax; "
                            f"print(jax.__version__)')\"`)") from e
    devices = list(desc.devices)
    if len(devices) != topo.chips:
        raise TopologyError(f"libtpu reports {len(devices)} devices for {topo}, expected {topo.chips} "
                            f"(one per chip); this libtpu version may not support megacore for "
                            f"{topo.generation.name}")
    return devices
