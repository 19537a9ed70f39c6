"""The training loop: I/O, logging, evaluation and checkpointing at the edges of the pure step.

``train(cfg, workdir)`` validates the config, builds the mesh, creates the state directly sharded,
streams batches, runs the jitted step, logs ``metrics.jsonl`` / TensorBoard / a progress bar, evaluates
every ``eval_every`` steps on the held-out split, and saves checkpoints.

Step numbering: ``step`` in metrics is the number of optimizer updates done; the ``loss`` logged at
step ``s`` is the training loss of the batch of update ``s``; ``eval_loss`` at ``s`` is measured after
``s`` updates (step 0 = the initial model).
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
import time

import jax
from tqdm import tqdm

from glmjax.checkpoint import Checkpointer, check_compatible, init_workdir_from
from glmjax.config import validate
from glmjax.distributed import compiled_in_step
from glmjax.scaling.flops import flops_per_token
from glmjax.sharding import batch_sharding, make_mesh
from glmjax.train.metrics import MetricsWriter, peak_flops_per_device
from glmjax.train.state import init_state, model_spec
from glmjax.train.step import make_eval_step, make_train_step

MOE_METRICS = ("moe_imbalance", "moe_imbalance_mean", "router_entropy", "moe_aux_loss")  # MoE models only

log = logging.getLogger("glmjax.train")


def _default_pipelines(cfg):
    from glmjax.data.pipeline import make_pipeline, to_global

    return make_pipeline(cfg, "train"), (lambda: make_pipeline(cfg, "validation")), to_global


def _with_streams(cfg, workdir, sharding):
    """A copy of ``cfg`` with ``data.streams`` resolved (auto -> the checkpoint's, or one per row group),
    so the checkpoints of this run record it and a resume on any host count keeps the same streams."""
    from glmjax.checkpoint import saved_config
    from glmjax.data import streams
    from glmjax.data.global_batch import row_group

    count, why = streams.resolve(cfg, saved_config(workdir) if workdir else None,
                                 row_group(sharding, int(cfg.batch_size))[1])
    log.info("data: %d stream(s) of %d rows (%s)", count, cfg.batch_size // count, why)
    cfg = copy.deepcopy(cfg)
    cfg.data.streams = count
    return cfg


class Evaluator:
    """Mean eval loss over the first ``eval_steps`` batches of the validation split (cached host-side)."""

    def __init__(self, cfg, eval_step, make_iter, to_global, sharding):
        self.cfg, self.eval_step, self.make_iter = cfg, eval_step, make_iter
        self.to_global, self.sharding = to_global, sharding
        self._batches = None

    def prepare(self) -> None:
        """Read the eval batches now (before training starts), so an empty validation split is an
        error with a fix, not a ``StopIteration`` at the first evaluation."""
        if self._batches is not None:
            return
        it = self.make_iter()
        try:
            self._batches = []
            for _ in range(self.cfg.eval_steps):
                try:
                    self._batches.append(next(it))
                except StopIteration:
                    break
        finally:
            if hasattr(it, "close"):
                it.close()
        if not self._batches:
            raise ValueError(empty_validation_message(self.cfg))
        if len(self._batches) < self.cfg.eval_steps:
            log.warning("the validation split gave %d of eval_steps=%d batches; eval_loss averages over "
                        "those", len(self._batches), self.cfg.eval_steps)

    def __call__(self, params) -> float:
        self.prepare()
        total, weight = 0.0, 0.0
        for b in self._batches:
            s, w = jax.device_get(self.eval_step(params, self.to_global(b, self.sharding)))
            total, weight = total + float(s), weight + float(w)
        return total / max(weight, 1.0)


def train(cfg, workdir: str, *, restart: bool = True, pipelines=None) -> dict:
    """Run (or resume) training. ``pipelines`` = (train iterator, eval-iterator factory, to_global) for tests."""
    validate(cfg, jax.device_count())
    if "://" not in workdir:  # orbax/tensorstore need absolute local paths; gs:// etc. pass through
        workdir = os.path.abspath(workdir)
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise ValueError(f"--workdir={workdir} is an existing file, not a directory: the run writes "
                             "metrics.jsonl, tensorboard/ and checkpoints/ into it; pass a directory path "
                             "(it is created if missing)")
    if restart and cfg.checkpoint.get("init_from", ""):  # a fork: begin from a step of another workdir
        init_workdir_from(workdir, cfg.checkpoint.init_from, cfg.checkpoint.get("init_step", -1))
    if restart:
        check_compatible(workdir, cfg)  # a different model on this workdir fails now, not after data set-up
    mesh = make_mesh(cfg)
    cfg = _with_streams(cfg, workdir if restart else None, batch_sharding(mesh))
    spec = model_spec(cfg, mesh)
    fpt = flops_per_token(cfg.model, cfg.seq_len)
    log.info("model: %.2fM parameters (%.2fM non-embedding); mesh %s", fpt.params / 1e6,
             fpt.non_embedding_params / 1e6, dict(mesh.shape))
    train_iter, make_eval_iter, to_global = pipelines or _default_pipelines(cfg)
    bsh = batch_sharding(mesh)
    eval_step = compiled_in_step(make_eval_step(cfg, spec, mesh), "eval step")
    evaluate = Evaluator(cfg, eval_step, make_eval_iter, to_global, bsh)
    if cfg.eval_every:
        try:
            evaluate.prepare()  # an empty validation split fails here, before anything is compiled
        except BaseException:
            if hasattr(train_iter, "close"):
                train_iter.close()
            raise

    # CHECKPOINT: create the Checkpointer and restore (state, data_state) from the latest good checkpoint
    ckpt = Checkpointer(workdir, cfg, restart=restart)
    ckpt.install_sigterm_handler()  # from here on SIGTERM means: save at the next step boundary, exit 0
    restored = ckpt.restore(spec.abstract_state)
    if restored is None:
        state = init_state(cfg, spec)
    else:
        state, data_state, restored_step = restored
        if data_state is not None or jax.process_count() > 1:  # collective: every host takes one decision
            if "others" in inspect.signature(train_iter.set_state).parameters:  # the host count may differ
                train_iter.set_state(data_state, others=ckpt.saved_data_states(restored_step))
            else:
                train_iter.set_state(data_state)
    if hasattr(train_iter, "start"):
        train_iter.start()  # produce the first batches while the step compiles (a no-op after set_state)
    start = int(jax.device_get(state.step))
    if start >= cfg.steps:
        if hasattr(train_iter, "close"):
            train_iter.close()
        ckpt.close()
        log.info(already_done_message(start, cfg.steps, ckpt.directory))
        return {"state": state, "step": start, "already_done": True}

    is_main = jax.process_index() == 0
    writer = MetricsWriter(workdir, enabled=is_main)
    writer.truncate_after(start if restored is not None else -1)  # a fresh start rewrites step 0 as well
    train_step = compiled_in_step(make_train_step(cfg, spec, mesh), "train step")
    peak, peak_src = peak_flops_per_device()
    log.info("peak FLOP/s per device: %.3g (%s); %d devices", peak, peak_src, jax.device_count())

    last = {}
    if start == 0 and cfg.eval_every:
        last["eval_loss"] = evaluate(state.params)
        writer.write(0, last)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    bar = tqdm(total=cfg.steps, initial=start, disable=not is_main, dynamic_ncols=True, desc="train")
    t_last, steps_since = None, 0
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = to_global(next(train_iter), bsh)
            state, metrics = train_step(state, batch)
            if t_last is None:  # the first step includes compilation: start the clock after it
                jax.block_until_ready(metrics)
                t_last, steps_since = time.perf_counter(), 0
            else:
                steps_since += 1
            record = {}
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                tps = tokens_per_step * steps_since / (now - t_last) if steps_since else 0.0
                record.update(loss=float(metrics["loss"]), learning_rate=float(metrics["learning_rate"]),
                              grad_norm=float(metrics["grad_norm"]), tokens_per_second=tps,
                              mfu=tps * fpt.train / (peak * jax.device_count()))
                record.update({k: float(metrics[k]) for k in MOE_METRICS if k in metrics})
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}")
                t_last, steps_since = now, 0
            if cfg.eval_every and step % cfg.eval_every == 0:
                record["eval_loss"] = evaluate(state.params)
                t_last, steps_since = time.perf_counter(), 0
            if record:
                writer.write(step, record)
                last.update(record)
            bar.update(1)
            # CHECKPOINT: save (state, train_iter.get_state()) every checkpoint.every; preemption check
            preempted = ckpt.preemption_requested(step)
            ckpt.save(step, state, train_iter.get_state(), eval_loss=record.get("eval_loss"),
                      force=preempted or step == cfg.steps)  # the last step is always saved
            if preempted:
                ckpt.wait()
                log.warning("preempted: checkpoint of step %d saved in %s; exiting. Run the same command to "
                            "resume.", step, ckpt.directory)
                break
    finally:
        bar.close()
        # CHECKPOINT: final save, wait for async saves, close
        ckpt.close()  # the final step was saved in the loop; this waits until every save is committed
        writer.close()
        if hasattr(train_iter, "close"):
            train_iter.close()
    return {"state": state, "step": int(jax.device_get(state.step)), **last}


def already_done_message(step: int, steps: int, directory: str) -> str:
    if step == steps:
        head = f"already at step {step} of {steps}: the latest checkpoint in {directory} finished this run"
    else:
        head = (f"the latest checkpoint in {directory} is at step {step}, past --config.steps={steps}")
    return (f"{head}; nothing to train. To train further, raise the step count (e.g. "
            f"--config.steps={2 * max(step, 1)}); to start over, add --restart=false.")


def empty_validation_message(cfg) -> str:
    from glmjax.data.inspect import split_document_counts

    counts = split_document_counts(cfg)
    where = ", ".join(f"{k}: {v['train']} train / {v['validation']} validation documents"
                      for k, v in counts.items())
    total = sum(v["train"] + v["validation"] for v in counts.values())
    frac = float(cfg.data.validation_fraction)
    need = min(0.5, max(frac * 2, 2.0 / max(total, 1)))
    return (f"the validation split is empty, so evaluation (eval_every={cfg.eval_every}) has nothing to "
            f"measure: data.task={cfg.data.task!r} ({where}); data.validation_fraction={frac:g} holds out "
            f"that share of files (JSONL: lines) by a hash of their names. Fix: hold out more with "
            f"--config.data.validation_fraction={need:.2g}, or train without evaluation with "
            f"--config.eval_every=0")
