"""Checkpoints: async orbax saves of ``{state, data, config}`` under ``WORKDIR/checkpoints``; resume; preemption.

Layout (one orbax ``CheckpointManager`` step directory per saved step)::

    WORKDIR/checkpoints/<step>/state/                    train state (StandardSave: tensorstore, OCDBT)
    WORKDIR/checkpoints/<step>/data/process_<i>.json     data position saved by host i (one file per host)
    WORKDIR/checkpoints/<step>/config/config.json        the full run config
    WORKDIR/checkpoints/<step>/metrics/metrics           {"eval_loss": ...} (ranks the "best" checkpoint)
    WORKDIR/checkpoint_fingerprints/<step>.json          a fingerprint per state leaf (see integrity.py)

Why the data item is one file per host: every host runs the data streams of its own rows and saves the
snapshots of the streams it owns (see ``glmjax/data/streams.py``). orbax's ``JsonCheckpointHandler``
writes on the primary host only, unless its ``primary_host`` is ``None``; the ``data`` item gets a
handler with ``primary_host=None`` and a file name carrying ``jax.process_index()``, so every host
writes its own file inside the same step directory. No collective is needed, and the step is still
committed once, by the primary host, after all hosts have finished writing. On resume a host reads
its own file and, when the host count changed, the others it needs (``saved_data_states``).

Atomicity: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it once every item is
written (on GCS it writes a commit marker instead). A crash mid-save leaves only a tmp directory, which is
never listed as a step and is deleted when the next run starts. A committed step damaged later
(truncated, missing or corrupted files) fails to restore or fails its fingerprints; ``restore`` then
warns naming the step and what is wrong, moves it to ``WORKDIR/checkpoints_damaged/`` and uses the
previous one.

Forks: ``checkpoint.init_from`` starts a new workdir from a step of another (see fork.py).

Retention: the latest ``checkpoint.keep`` steps plus the one with the lowest eval loss.

See docs/checkpoints.md for resuming, preemption and restoring into another mesh.
"""
from glmjax.checkpoint.fork import init_workdir_from
from glmjax.checkpoint.integrity import fingerprints
from glmjax.checkpoint.manager import DAMAGED_DIR, FINGERPRINT_DIR, CheckpointError, Checkpointer
from glmjax.checkpoint.run_files import (CHECKPOINT_DIR, ConfigMismatchError, check_compatible, config_to_dict,
                                         saved_config)

__all__ = ["CHECKPOINT_DIR", "DAMAGED_DIR", "FINGERPRINT_DIR", "CheckpointError", "Checkpointer", "ConfigMismatchError",
           "check_compatible", "config_to_dict", "fingerprints", "init_workdir_from", "saved_config"]
