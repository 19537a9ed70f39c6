"""The :class:`Checkpointer`: an orbax ``CheckpointManager`` over the items ``state``, ``data``, ``config``.

See the package docstring (:mod:`glmjax.checkpoint`) for the layout on disk and the guarantees.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp
from etils import epath

from glmjax.checkpoint.integrity import FingerprintStore, local_int
from glmjax.checkpoint.run_files import CHECKPOINT_DIR, check_compatible, config_to_dict, step_dirs

log = logging.getLogger("glmjax.checkpoint")

DAMAGED_DIR = "checkpoints_damaged"
FINGERPRINT_DIR = "checkpoint_fingerprints"
DEFAULTS = {"every": 500, "keep": 3, "async_save": True, "verify": True}


class CheckpointError(RuntimeError):
    """No checkpoint could be restored; the message lists what is wrong with each one and the fix."""


def _ckpt_option(cfg, name: str):
    section = cfg.get("checkpoint", None) if hasattr(cfg, "get") else None
    if section is not None and name in section:
        return section[name]
    return DEFAULTS[name]


def _best_metric(metrics) -> float:
    value = (metrics or {}).get("eval_loss")
    return float(value) if value is not None else math.inf


def _retention_options(keep: int) -> dict:
    """Keep the latest ``keep`` steps plus the best one by eval loss."""
    try:
        pp = ocp.checkpoint_managers.preservation_policy
    except AttributeError:  # older orbax: best_fn + max_to_keep keeps the `keep` best instead
        return {"max_to_keep": keep}
    return {"preservation_policy": pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        pp.BestN(get_metric_fn=_best_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
    ])}


class Checkpointer:
    """Saves and restores ``{state, data, config}`` in ``WORKDIR/checkpoints`` (see the module docstring).

    ``restart=True`` resumes from the workdir's checkpoints (after :func:`check_compatible`);
    ``restart=False`` starts over: existing checkpoints are moved to ``checkpoints.old-<time>``.
    """

    def __init__(self, workdir: str, cfg, *, restart: bool = True):
        self.workdir = epath.Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.every = int(_ckpt_option(cfg, "every"))
        self.keep = max(1, int(_ckpt_option(cfg, "keep")))
        self.async_save = bool(_ckpt_option(cfg, "async_save"))
        self._fingerprints = FingerprintStore(self.workdir / FINGERPRINT_DIR, bool(_ckpt_option(cfg, "verify")))
        self._config = config_to_dict(cfg)
        if restart:
            check_compatible(self.workdir, cfg, note=False)  # the loop checked (and noted) it already
        elif _on_all_hosts(bool(step_dirs(self.directory)), want=any):  # decided before anything moves
            self._move_aside(self.directory, self.workdir / f"{CHECKPOINT_DIR}.old-{time.strftime('%Y%m%d-%H%M%S')}",
                             "--restart=false: starting over; the old checkpoints")
        self._mngr = self._make_manager()
        self._fingerprints.prune(self._mngr.all_steps())
        self._sigterm = threading.Event()
        self._previous_handler = None
        self._save_started: dict[int, float] = {}

    def _make_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric, best_mode="min",
            keep_checkpoints_without_metrics=False, enable_async_checkpointing=self.async_save,
            create=True, cleanup_tmp_directories=True, **_retention_options(self.keep))
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(
                filename=f"process_{jax.process_index()}.json",
                multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=None)),
            "config": ocp.JsonCheckpointHandler(filename="config.json"),
        }
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    @staticmethod
    def _move_aside(src: epath.Path, dst: epath.Path, what: str) -> None:
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.rename(dst)
            log.warning("%s: moved to %s (delete it when no longer needed)", what, dst)
        _sync("glmjax_checkpoint_move_aside")

    # ------------------------------------------------------------------------------------ queries

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def best_step(self) -> int | None:
        return self._mngr.best_step()

    # ------------------------------------------------------------------------------------ restore

    def restore(self, abstract_state, step: int | None = None):
        """Restore ``(state, data_state, step)`` from the newest complete checkpoint, or None if there is none.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` carrying the shardings wanted now (any
        mesh); orbax reads each shard straight into place. A damaged checkpoint is skipped with a warning
        naming what is wrong and moved to ``WORKDIR/checkpoints_damaged``; the previous one is used. With
        an explicit ``step`` only that step is tried and an error is raised if it cannot be read.
        ``data_state`` is None if this host has no saved iterator state (the host count changed).
        """
        self._mngr.reload()
        candidates = [step] if step is not None else sorted(self._mngr.all_steps(), reverse=True)
        if not candidates:
            return None
        failures = []
        for s in candidates:
            state, data_state, reason = None, None, None
            try:
                state, data_state = self._read_step(abstract_state, s)
            except Exception as e:  # noqa: BLE001 -- any read error means this step is unusable
                reason = _describe(e)
            if not _on_all_hosts(reason is None):  # every host must have read its shards of the same step
                reason = reason or "could not be read on another host (see that host's log)"
            if reason is None:
                try:  # collective (same verdict on every host)
                    self._check_step(s, state)
                except Exception as e:  # noqa: BLE001
                    reason = _describe(e)
            if reason is not None:
                failures.append((s, reason))
                if step is None:
                    log.warning("checkpoint step %d in %s is damaged and is skipped (%s); trying the previous "
                                "one", s, self.directory, reason)
                continue
            for bad, _ in failures:  # newer than the good one: out of the way of future saves
                self._move_aside(self.directory / str(bad), self.workdir / DAMAGED_DIR / f"{bad}-{int(time.time())}",
                                 f"damaged checkpoint step {bad}")
            if failures:
                self._mngr.reload()
            log.info("restored checkpoint step %d from %s", s, self.directory)
            return state, data_state, s
        listing = "\n  ".join(f"step {s}: {r}" for s, r in failures)
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be restored:\n  {listing}\nIf the model or optimizer "
            f"config changed, run with the config the checkpoints were saved with; to start over, pass "
            f"--restart=false or use a new --workdir.")

    def _read_step(self, abstract_state, step: int):
        step_dir = self.directory / str(step)
        for item in ("state", "config"):
            if not (step_dir / item).exists():
                raise FileNotFoundError(f"item {item!r} is missing ({step_dir / item})")
        for path in [step_dir / "_CHECKPOINT_METADATA", step_dir / "state" / "_METADATA",
                     *(step_dir / "data").glob("*.json"), *(step_dir / "config").glob("*.json")]:
            try:
                json.loads(path.read_text()) if path.exists() else None
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None
        data_file = step_dir / "data" / f"process_{jax.process_index()}.json"
        has_data = data_file.exists()
        if not has_data:
            saved = list((step_dir / "data").glob("process_*.json")) if (step_dir / "data").exists() else []
            if not saved:
                raise FileNotFoundError(f"item 'data' is missing ({step_dir / 'data'})")
            log.info("checkpoint step %d has data-iterator state for %d host(s), none for host %d (the host "
                     "count changed): the input pipeline reads its streams' positions from the other files",
                     step, len(saved), jax.process_index())
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], (restored["data"] if has_data else None)

    def saved_data_states(self, step: int) -> list:
        """Every host's saved data-iterator state of ``step``, as zero-argument callables in process
        order, each reading one file when called (a host whose streams were saved by other hosts, after
        a host-count change, reads only the files it needs)."""
        data_dir = self.directory / str(step) / "data"
        files = list(data_dir.glob("process_*.json")) if data_dir.exists() else []
        files.sort(key=lambda p: int(p.stem.rpartition("_")[2] or 0))
        return [lambda path=path: json.loads(path.read_text()) for path in files]

    def _check_step(self, step: int, state) -> None:
        self._fingerprints.check(step, state)
        saved_step = local_int(state.step) if hasattr(state, "step") else step
        if saved_step != step:
            raise ValueError(f"state.step={saved_step} does not match the step directory {step}")

    # ------------------------------------------------------------------------------------ save

    def should_save(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, data_state: dict, *, eval_loss: float | None = None,
             force: bool = False) -> bool:
        """Start saving ``step`` (async unless ``checkpoint.async_save=False``); True if a save started.

        Saves when ``step % checkpoint.every == 0`` or ``force``. The call blocks only while the arrays are
        copied off the devices (and for the previous save to finish, if it is still running); ``state``
        may be donated to the next train step as soon as it returns. A step already saved is skipped.
        """
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            log.warning("checkpoint step %d already exists in %s: not saved again", step, self.directory)
            return False
        loss = None if eval_loss is None or not math.isfinite(float(eval_loss)) else float(eval_loss)
        start = time.perf_counter()
        self._fingerprints.start(step, state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
                                  config=ocp.args.JsonSave(self._config))
        saved = self._mngr.save(step, args=args, metrics={"eval_loss": loss}, force=True)
        self._fingerprints.prune(self._mngr.all_steps())  # of steps just dropped by the retention policy
        if saved:
            self._save_started[step] = start
            log.info("checkpoint step %d: save started (%s, blocked %.2fs)", step,
                     "async" if self.async_save else "sync", time.perf_counter() - start)
        return saved

    def wait(self) -> None:
        """Block until every started save is committed; raises if one failed."""
        self._mngr.wait_until_finished()
        self._mngr.check_for_errors()
        self._fingerprints.wait()
        self._fingerprints.prune(self._mngr.all_steps())
        for step, start in self._save_started.items():
            log.info("checkpoint step %d committed to %s (%.2fs after the save started)", step,
                     self.directory / str(step), time.perf_counter() - start)
        self._save_started.clear()

    def close(self) -> None:
        self.wait()
        self._mngr.close()
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    # ------------------------------------------------------------------------------------ preemption

    def install_sigterm_handler(self) -> None:
        """On SIGTERM, only note it: the loop saves at the next step boundary (:meth:`preemption_requested`).

        Single-host only: with several processes JAX's preemption service owns SIGTERM and
        :meth:`preemption_requested` asks orbax for the sync point that all hosts reach at the same step.
        """
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return

        def handler(signum, frame):
            del frame
            log.warning("received signal %d: will save a checkpoint at the next step and exit", signum)
            self._sigterm.set()

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def preemption_requested(self, step: int) -> bool:
        """True when the run should save now and exit (SIGTERM seen, or orbax's multi-host sync point)."""
        if self._sigterm.is_set():
            return True
        return jax.process_count() > 1 and self._mngr.reached_preemption(step)


def _describe(error: BaseException) -> str:
    """One line naming what is wrong: the messages of the exception chain, innermost (most specific) first."""
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).split(" See full TensorStore details")[0].strip()
        first = text.splitlines()[0] if text else ""
        parts.append(f"{type(error).__name__}: {first}" if first else type(error).__name__)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return " <- ".join(reversed(parts))


def _on_all_hosts(flag: bool, want=all) -> bool:
    """``want`` (all / any) of ``flag`` over every process: one answer that all hosts agree on."""
    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(want(np.asarray(multihost_utils.process_allgather(np.int32(flag))).ravel()))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
