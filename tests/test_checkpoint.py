"""Checkpointer unit tests on a toy sharded train state (8 fake CPU devices).

Covers: round trip with donation right after an async save, retention (latest ``keep`` + best), damaged
checkpoints (truncated / corrupted / bad JSON / crash leftovers) falling back with a warning, layout-free
fingerprints, the model-config check and ``restart=False``, SIGTERM. (Restoring the real model into other
meshes: test_checkpoint_mesh.py; killed and preempted runs end to end: test_checkpoint_resume.py.)
"""
from __future__ import annotations

import functools
import json
import logging
import os
import signal
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glmjax.checkpoint import (FINGERPRINT_DIR, CheckpointError, Checkpointer, ConfigMismatchError,
                               check_compatible, fingerprints)

D, H, V, B = 128, 256, 64, 16  # toy MLP language model: embed V->D, hidden H, batch B
# (arrays big enough that orbax stores their chunks out of line, in the array files, not in b-tree nodes)


@flax.struct.dataclass
class ToyState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def toy_cfg(every=1, keep=2, hidden=H, **ckpt):
    return ml_collections.ConfigDict({
        "seed": 0, "model": {"hidden": hidden, "vocab": V},
        "checkpoint": {"every": every, "keep": keep, **ckpt}})


TX = optax.adamw(1e-2, weight_decay=0.1)
# logical layout of each parameter: which dims are split over (fsdp, tensor)
AXES = {"embed": ("fsdp", "tensor"), "w1": ("fsdp", "tensor"), "b1": ("tensor",), "w2": ("tensor", "fsdp")}


def mesh_of(data=1, fsdp=1, tensor=1):
    n = data * fsdp * tensor
    return Mesh(np.asarray(jax.devices()[:n]).reshape(data, fsdp, tensor), ("data", "fsdp", "tensor"))


def shardings(mesh):
    param = {k: NamedSharding(mesh, P(*ax)) for k, ax in AXES.items()}
    rep = NamedSharding(mesh, P())
    abs_params = abstract_params()
    opt = optax.tree_map_params(TX, lambda _, s: s, jax.eval_shape(TX.init, abs_params), param,
                                transform_non_params=lambda _: rep)
    return ToyState(step=rep, params=param, opt_state=opt)


def abstract_params():
    return {"embed": jax.ShapeDtypeStruct((V, D), jnp.float32), "w1": jax.ShapeDtypeStruct((D, H), jnp.float32),
            "b1": jax.ShapeDtypeStruct((H,), jnp.float32), "w2": jax.ShapeDtypeStruct((H, D), jnp.float32)}


def abstract_state(mesh):
    abs_params = abstract_params()
    tree = ToyState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abs_params,
                    opt_state=jax.eval_shape(TX.init, abs_params))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings(mesh))


def init_state(mesh, seed=0):
    return _init_fn(mesh)(jnp.uint32(seed))


@functools.cache
def _init_fn(mesh):
    def init(seed):
        keys = jax.random.split(jax.random.key(seed), 4)
        params = {k: jax.random.normal(kk, s.shape) * 0.1 for kk, (k, s) in zip(keys, abstract_params().items())}
        return ToyState(step=jnp.zeros((), jnp.int32), params=params, opt_state=TX.init(params))
    return jax.jit(init, out_shardings=shardings(mesh))


def loss_fn(params, tokens):
    x = params["embed"][tokens[:, 0]]
    h = jax.nn.gelu(x @ params["w1"] + params["b1"])
    logits = (h @ params["w2"]) @ params["embed"].T
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(tokens.shape[0]), tokens[:, 1]])


@functools.cache
def make_step(mesh):
    sh = shardings(mesh)

    def step(state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
        updates, opt = TX.update(grads, state.opt_state, state.params)
        return ToyState(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt), loss

    return jax.jit(step, in_shardings=(sh, NamedSharding(mesh, P(("data", "fsdp")))),
                   out_shardings=(sh, NamedSharding(mesh, P())), donate_argnums=0)


def batch(i):
    return jnp.asarray(np.random.default_rng(1000 + i).integers(0, V, (B, 2)), jnp.int32)


def train(ckpt, mesh, steps, state=None, start=0, eval_losses=None):
    state = init_state(mesh) if state is None else state
    step_fn = make_step(mesh)
    for s in range(start + 1, steps + 1):
        state, _ = step_fn(state, batch(s))
        ckpt.save(s, state, {"position": s}, eval_loss=(eval_losses or {}).get(s))
    return state


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, host(a), host(b))


def step_dirs(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


# --------------------------------------------------------------------------------------------- tests


def test_roundtrip_survives_donation_after_async_save(tmp_path):
    """The async save must have copied the arrays before save() returns: donate them right after."""
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=3))
    state = train(ckpt, mesh, 3)  # saves step 3
    expected = host(state)
    step_fn = make_step(mesh)
    for s in range(4, 6):  # donates the buffers of the saved state while the save may still run
        state, _ = step_fn(state, batch(s))
    assert ckpt.save(4, state, {"position": 4}) is False  # not a multiple of every
    ckpt.wait()
    assert (tmp_path / FINGERPRINT_DIR / "3.json").exists()  # computed before the donation; checked below
    restored, data_state, step = ckpt.restore(abstract_state(mesh))
    ckpt.close()
    assert step == 3 and data_state == {"position": 3}
    assert_trees_equal(restored, expected)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract_state(mesh))):
        assert leaf.sharding == want.sharding


def test_retention_keeps_latest_and_best(tmp_path):
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2, keep=2))
    train(ckpt, mesh, 12, eval_losses={4: 1.5, 8: 2.0, 12: 3.0})
    ckpt.wait()
    assert step_dirs(tmp_path) == [4, 10, 12]  # latest 2 + the best (step 4, eval_loss 1.5)
    assert ckpt.best_step() == 4
    ckpt.close()
    again = Checkpointer(str(tmp_path), toy_cfg(every=2, keep=2))  # a restart keeps the same view
    assert again.all_steps() == [4, 10, 12] and again.best_step() == 4
    state, _, step = again.restore(abstract_state(mesh))
    train(again, mesh, 14, state=state, start=step)
    again.close()
    assert step_dirs(tmp_path) == [4, 12, 14]
    assert sorted(int(p.stem) for p in (tmp_path / FINGERPRINT_DIR).glob("*.json")) == [4, 12, 14]


def _largest_array_file(step_dir: Path) -> Path:
    """The largest file of chunk data (under ``ocdbt.process_*/d``; the top ``d/`` holds b-tree nodes)."""
    files = [p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_array_file(step_dir)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return "OUT_OF_RANGE"


def _flip_bytes(step_dir):
    f = _largest_array_file(step_dir)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0x5A for b in data[mid:mid + 16])
    f.write_bytes(bytes(data))
    return "does not match the fingerprint"


def _bad_metadata(step_dir):
    (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": ')
    return "_METADATA is not valid JSON"


def _missing_data(step_dir):
    for f in (step_dir / "data").iterdir():
        f.unlink()
    (step_dir / "data").rmdir()
    return "item 'data' is missing"


@pytest.mark.parametrize("damage", [_truncate, _flip_bytes, _bad_metadata, _missing_data])
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, damage):
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2, keep=3))
    state = train(ckpt, mesh, 2)
    ckpt.wait()
    expected = host(ckpt.restore(abstract_state(mesh))[0])
    train(ckpt, mesh, 4, state=state, start=2)
    ckpt.close()
    what = damage(tmp_path / "checkpoints" / "4")

    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2, keep=3))
    with caplog.at_level(logging.WARNING, logger="glmjax.checkpoint"):
        state, data_state, step = ckpt.restore(abstract_state(mesh))
    assert step == 2 and data_state == {"position": 2}
    assert_trees_equal(state, expected)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "step 4" in warning and "damaged" in warning and what in warning, warning
    assert step_dirs(tmp_path) == [2]  # moved aside: the next save of step 4 does not collide
    assert any((tmp_path / "checkpoints_damaged").iterdir())
    assert ckpt.save(4, state, {"position": 4})
    ckpt.close()


def test_crash_leftovers_are_never_restored(tmp_path):
    """A save killed before its commit leaves a tmp directory: not a step, cleaned up at the next start."""
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2))
    train(ckpt, mesh, 2)
    ckpt.close()
    tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")  # half written
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2))
    assert ckpt.latest_step() == 2
    assert ckpt.restore(abstract_state(mesh))[2] == 2
    ckpt.close()
    assert not tmp.exists()


def test_all_damaged_is_an_error_and_moves_nothing(tmp_path):
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2))
    train(ckpt, mesh, 2)
    ckpt.close()
    _bad_metadata(tmp_path / "checkpoints" / "2")
    with pytest.raises(CheckpointError, match=r"(?s)step 2: .*not valid JSON.*--restart=false"):
        Checkpointer(str(tmp_path), toy_cfg(every=2)).restore(abstract_state(mesh))
    assert step_dirs(tmp_path) == [2]


def test_fingerprints_do_not_depend_on_the_layout():
    a = init_state(mesh_of(data=8))
    b = jax.device_put(a, shardings(mesh_of(fsdp=4, tensor=2)))
    assert fingerprints(a) == fingerprints(b)
    c = a.replace(params={**a.params, "b1": a.params["b1"].at[3].add(1e-6)})
    changed = [k for k, v in fingerprints(c).items() if fingerprints(a)[k] != v]
    assert changed == [".params['b1']"]


def test_model_config_change_is_refused(tmp_path):
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2))
    train(ckpt, mesh, 2)
    ckpt.close()
    check_compatible(str(tmp_path), toy_cfg(every=5))  # checkpoint keys may change
    with pytest.raises(ConfigMismatchError, match=r"(?s)model.hidden: checkpoint has 256, this run has 512.*"
                                                  r"--restart=false.*--workdir"):
        Checkpointer(str(tmp_path), toy_cfg(every=2, hidden=512))
    # --restart=false starts over: the old checkpoints are moved aside, not restored
    fresh = Checkpointer(str(tmp_path), toy_cfg(every=2, hidden=512), restart=False)
    assert fresh.latest_step() is None and fresh.restore(abstract_state(mesh)) is None
    fresh.close()
    old = [p for p in tmp_path.iterdir() if p.name.startswith("checkpoints.old-")]
    assert len(old) == 1 and (old[0] / "2" / "config" / "config.json").exists()


def test_data_state_of_a_missing_host_is_none(tmp_path, caplog):
    """Restored with another host count: this host has no iterator state; the state still restores."""
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=2))
    train(ckpt, mesh, 2)
    ckpt.close()
    data = tmp_path / "checkpoints" / "2" / "data"
    (data / "process_0.json").rename(data / "process_1.json")
    with caplog.at_level(logging.INFO, logger="glmjax.checkpoint"):  # a normal resize: an info line
        _, data_state, step = Checkpointer(str(tmp_path), toy_cfg(every=2)).restore(abstract_state(mesh))
    assert step == 2 and data_state is None
    assert "host count changed" in caplog.text


def test_saved_items_and_sync_mode(tmp_path):
    mesh = mesh_of(data=8)
    ckpt = Checkpointer(str(tmp_path), toy_cfg(every=1, async_save=False))
    train(ckpt, mesh, 1)  # synchronous: committed when save() returns
    step_dir = tmp_path / "checkpoints" / "1"
    assert json.loads((step_dir / "config" / "config.json").read_text())["model"]["hidden"] == H
    assert json.loads((step_dir / "data" / "process_0.json").read_text()) == {"position": 1}
    assert set(json.loads((tmp_path / FINGERPRINT_DIR / "1.json").read_text())["state"]) == set(
        fingerprints(init_state(mesh)))
    assert ckpt.save(1, init_state(mesh), {}, force=True) is False  # already saved: skipped
    ckpt.close()


def test_sigterm_sets_the_preemption_flag(tmp_path):
    ckpt = Checkpointer(str(tmp_path), toy_cfg())
    previous = signal.getsignal(signal.SIGTERM)
    ckpt.install_sigterm_handler()
    try:
        assert not ckpt.preemption_requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.preemption_requested(2)
    finally:
        ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == previous
