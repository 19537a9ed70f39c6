"""The mesh follows the device topology or fails with a fix (fake TPU devices with coordinates), CPU
devices are laid out process by process, and bad mesh / batch input fails before anything compiles."""
import dataclasses
import itertools
import logging

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from glmjax.config import ConfigError, load_config
from glmjax.sharding import device_grid, make_mesh
from test_train import TINY


@dataclasses.dataclass(frozen=True)
class FakeTpu:
    id: int
    process_index: int
    coords: tuple
    core_on_chip: int = 0
    slice_index: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v5"  # v5p: one core per chip, 4 chips per host


def fake_slice(x, y, z):
    """Chips of an x*y*z torus in jax.devices() order (x fastest), 4 per host."""
    coords = [(i, j, k) for k, j, i in itertools.product(range(z), range(y), range(x))]
    return [FakeTpu(n, n // 4, c) for n, c in enumerate(coords)]


def ids(grid):
    return np.vectorize(lambda d: d.id)(grid)


def test_tpu_mesh_follows_the_torus_and_splits_axes_only_when_it_must(caplog):
    devs = fake_slice(4, 4, 4)  # v5p-128: the shape of the issue, fsdp=8 x tensor=8 over a 4x4x4 torus
    with caplog.at_level(logging.INFO, logger="glmjax.sharding"):
        grid = device_grid((1, 8, 8), devs)
    want = mesh_utils.create_device_mesh((1, 8, 8), devices=devs, allow_split_physical_axes=True)
    np.testing.assert_array_equal(ids(grid), ids(want))  # topology-aware, not reshaped jax.devices()
    assert not np.array_equal(ids(grid).ravel(), np.arange(64))
    assert "splits a physical axis" in caplog.text
    # each tensor group is a compact 2x2x2 (or 4x2x1) block of neighbouring chips
    for group in grid.reshape(8, 8):
        span = np.ptp(np.array([d.coords for d in group]), axis=0) + 1
        assert int(np.prod(span)) == 8, span
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="glmjax.sharding"):
        grid = device_grid((4, 4, 4), devs)  # one physical axis per mesh axis: no split needed
    np.testing.assert_array_equal(ids(grid), ids(mesh_utils.create_device_mesh((4, 4, 4), devices=devs)))
    assert "splits" not in caplog.text


def test_tpu_devices_that_are_no_slice_are_an_error_with_a_fix():
    devs = fake_slice(2, 2, 2)
    holed = devs[:3] + [dataclasses.replace(devs[3], coords=(5, 5, 5))]
    with pytest.raises(ConfigError, match=r"mesh \(data, fsdp, tensor\)=\(1, 2, 2\) cannot follow the physical "
                                          r"topology of these 4 TPU devices.*Fix: .*whole slices"):
        device_grid((1, 2, 2), holed)


def test_cpu_mesh_is_process_major_and_bad_shapes_fail_before_compile():
    mesh = make_mesh(load_config(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]))
    flat = list(mesh.devices.ravel())
    assert flat == sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    with pytest.raises(ConfigError, match="the mesh must use every device exactly once"):
        make_mesh(load_config(TINY, ["--config.mesh.data=3"]))


def test_batch_not_divisible_by_data_parallel_size_fails_before_compile(tmp_path, monkeypatch):
    from glmjax.train import loop

    def no_compile(*a, **k):
        raise AssertionError("compiled before the config error")

    monkeypatch.setattr(loop, "make_train_step", no_compile)
    monkeypatch.setattr(loop, "make_mesh", no_compile)
    cfg = load_config(TINY, ["--config.batch_size=12", "--config.mesh.data=8", "--config.mesh.fsdp=1",
                             "--config.mesh.tensor=1"])
    with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by data-parallel size "
                                          r"mesh.data\*mesh.fsdp=8 .*multiple of 8"):
        loop.train(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def two_slices(x, y, z):
    """Two x*y*z slices joined by the data-centre network (slice_index 0 and 1), 4 chips per host."""
    one = fake_slice(x, y, z)
    n = len(one)
    return one + [dataclasses.replace(d, id=n + d.id, process_index=n // 4 + d.process_index, slice_index=1)
                  for d in one]


def test_multislice_mesh_spans_slices_along_the_dcn_axes_only():
    devs = two_slices(2, 2, 2)  # 16 chips
    cfg = load_config(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2",
                             "--config.mesh.dcn_data=2"])
    grid = make_mesh(cfg, devs).devices[:, :, 0]  # the expert axis (size 1) dropped
    want = mesh_utils.create_hybrid_device_mesh((1, 4, 2), (2, 1, 1), devices=devs)
    np.testing.assert_array_equal(ids(grid), ids(want))
    for i in range(2):  # data index i = slice i: fsdp and tensor groups never cross the data-centre network
        assert {d.slice_index for d in grid[i].ravel()} == {i}
    cfg = load_config(TINY, ["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.tensor=2",
                             "--config.mesh.dcn_fsdp=2"])
    grid = make_mesh(cfg, devs).devices[:, :, 0]
    assert [{d.slice_index for d in grid[0, f].ravel()} for f in range(8)] == [{0}] * 4 + [{1}] * 4
    # inside a slice the layout follows the torus, as for one slice
    np.testing.assert_array_equal(ids(grid[0, :4]), ids(mesh_utils.create_device_mesh((1, 4, 2), devs[:8])[0]))


@pytest.mark.parametrize("overrides, message", [
    ([], r"these 16 devices are 2 slices \(device.slice_index\) but mesh.dcn_data=1 x mesh.dcn_fsdp=1 = 1.*"
         r"Fix: e.g. --config.mesh.dcn_data=2 --config.mesh.dcn_fsdp=1 --config.mesh.data=2"),
    (["--config.mesh.dcn_data=4"], r"are 2 slices .* = 4"),
    (["--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.mesh.dcn_data=2"],
     r"mesh.data=1 must be a multiple of the 2 slices it spans \(mesh.dcn_data=2\).*--config.mesh.data=2"),
    (["--config.mesh.dcn_data=0"], r"mesh.dcn_data=0 must be a positive integer"),
])
def test_multislice_mesh_errors_name_a_mesh_that_works(overrides, message):
    cfg = load_config(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=4", "--config.mesh.tensor=2", *overrides])
    with pytest.raises(ConfigError, match=message):
        make_mesh(cfg, two_slices(2, 2, 2))


def test_dcn_axes_on_one_slice_are_an_error():
    cfg = load_config(TINY, ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                             "--config.mesh.dcn_data=2"])
    with pytest.raises(ConfigError, match=r"= 2 slices, but these 8 devices are one slice.*dcn_data=1"):
        make_mesh(cfg, fake_slice(2, 2, 2))
    with pytest.raises(ConfigError, match="are one slice"):
        make_mesh(cfg)  # the CPU devices of this process: no slice_index
