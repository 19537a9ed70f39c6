"""Start a run from a step of another run's checkpoints (cooldown forks of a constant-LR run).

``checkpoint.init_from=SRC_WORKDIR`` (with ``checkpoint.init_step=STEP``, -1 = its newest step) makes a
run whose own workdir has no checkpoint yet begin by copying ``SRC_WORKDIR/checkpoints/STEP`` (state,
data-iterator position, config) and its fingerprint file into its workdir; the run then resumes from
that copy as if it had saved it itself. Once the workdir has a checkpoint of its own the keys are
ignored, so an interrupted fork resumes from its own checkpoints. The copy is written under a temporary
name and renamed when complete: a crash mid-copy leaves nothing that looks like a checkpoint.
"""
from __future__ import annotations

import logging
import shutil

import jax
from etils import epath

from glmjax.checkpoint.manager import FINGERPRINT_DIR, CheckpointError, _sync
from glmjax.checkpoint.run_files import CHECKPOINT_DIR, step_dirs

log = logging.getLogger("glmjax.checkpoint")
TMP_SUFFIX = ".glmjax-fork-tmp"


def _copy_tree(src: epath.Path, dst: epath.Path) -> None:
    if "://" not in str(src) and "://" not in str(dst):
        shutil.copytree(str(src), str(dst))
        return
    for path in src.rglob("*"):
        target = dst / str(path.relative_to(src))
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            path.copy(target)


def init_workdir_from(workdir, source, step: int = -1) -> int | None:
    """Copy checkpoint ``step`` of ``source`` into ``workdir`` unless ``workdir`` has checkpoints already.

    Returns the step copied, or None when nothing was copied (the workdir resumes from its own steps).
    """
    workdir, source = epath.Path(workdir), epath.Path(source)
    if step_dirs(workdir / CHECKPOINT_DIR):
        return None
    available = [s for s, _ in step_dirs(source / CHECKPOINT_DIR)]
    if not available:
        raise CheckpointError(f"checkpoint.init_from={source}: that workdir has no committed checkpoint; run "
                              f"the source run first (to at least the step to fork from), or fix the path")
    step = max(available) if int(step) < 0 else int(step)
    if step not in available:
        raise CheckpointError(f"checkpoint.init_from={source} has no checkpoint of step {step} (it has steps "
                              f"{sorted(available)}): fork from one of those with --config.checkpoint.init_step, or "
                              f"run the source run to step {step} first (it must still be kept there)")
    if jax.process_index() == 0:
        dst_dir = workdir / CHECKPOINT_DIR
        tmp = dst_dir / f"{step}{TMP_SUFFIX}"
        if tmp.exists():
            tmp.rmtree()
        dst_dir.mkdir(parents=True, exist_ok=True)
        _copy_tree(source / CHECKPOINT_DIR / str(step), tmp)
        fingerprint = source / FINGERPRINT_DIR / f"{step}.json"
        if fingerprint.exists():
            (workdir / FINGERPRINT_DIR).mkdir(parents=True, exist_ok=True)
            fingerprint.copy(workdir / FINGERPRINT_DIR / f"{step}.json", overwrite=True)
        tmp.rename(dst_dir / str(step))
        log.info("initialised %s from step %d of %s", workdir, step, source)
    _sync("glmjax_checkpoint_init_from")
    return step
