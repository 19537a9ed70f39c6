"""Run glmjax on a Slurm GPU cluster: write an sbatch script and submit it, one command.

    python launch/slurm.py --job_name=glm1b --nodes=2 --gpus_per_node=8 --partition=h100 --time=24:00:00 \\
        --setup="source $HOME/glmjax-venv/bin/activate" -- \\
        python -m glmjax.train --config=configs/glm_1b.py --workdir=/shared/runs/glm_1b

The script runs one task per node with ``srun``; each task is one JAX process that drives all GPUs of
its node (``JAX_LOCAL_DEVICE_IDS``; JAX's Slurm default is one GPU per task) and finds the others
through ``jax.distributed`` auto-detection from the Slurm environment (``--multihost``: coordinator =
first node of the step, port from the job id). Preemption: the job is ``--requeue``-able, Slurm sends
SIGTERM to the tasks 120 s before the time limit (``--signal``) and on preemption; training saves a
checkpoint and exits with 75, and the script requeues the job, which resumes from that checkpoint.

The script is written to ``--script`` (default ``slurm/JOB_NAME.sbatch``) and submitted with
``sbatch`` unless ``--no_submit``; ``--dry_run`` prints the script and the sbatch command, writes and
runs nothing. See docs/launch.md.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    PREEMPTED_EXIT_CODE, REPO, LaunchError, Runner, check_fit, git_commit, git_dirty, main_guard,
    parse_train_command, require, split_command, warn,
)

NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/scratch/local")


def render_script(args, train_args: list[str], commit: str) -> str:
    """The sbatch script: resources, one srun task per node running the training command, requeue on 75."""
    devices = ",".join(str(i) for i in range(args.gpus_per_node))
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={args.gpus_per_node}", "--exclusive", f"--time={args.time}",
                  f"--output={args.log_dir}/%x-%j.out", "--open-mode=append", "--signal=TERM@120"]
    if args.cpus_per_task:
        directives.append(f"--cpus-per-task={args.cpus_per_task}")
    for flag in ("partition", "account", "qos"):
        if getattr(args, flag):
            directives.append(f"--{flag}={getattr(args, flag)}")
    if not args.no_requeue:
        directives.append("--requeue")
    train = shlex.join([args.python, "-m", "glmjax.train", *train_args])
    lines = [
        "#!/bin/bash",
        f"# Written by launch/slurm.py for glmjax commit {commit[:12]}: {args.nodes} nodes x {args.gpus_per_node} GPUs.",
        *[f"#SBATCH {d}" for d in directives],
        "set -uo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        *([args.setup] if args.setup else []),
        f"export JAX_LOCAL_DEVICE_IDS={devices}",
        *[f"export {shlex.quote(e)}" for e in args.env],
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST"',
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {train}",
        "rc=$?",
    ]
    if not args.no_requeue:
        lines += [f"if [ $rc -eq {PREEMPTED_EXIT_CODE} ]; then",
                  '  echo "stopped early after saving a checkpoint: requeueing job $SLURM_JOB_ID"',
                  '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
                  "fi"]
    lines.append("exit $rc")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    flags, train_argv = split_command(argv)
    args = build_parser().parse_args(flags)
    require(args.job_name, "--job_name", "a name for the job, e.g. --job_name=glm1b")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise LaunchError(f"--nodes={args.nodes} and --gpus_per_node={args.gpus_per_node} must be >= 1")
    if not re.fullmatch(r"\d+(-\d+)?(:\d+){0,2}|\d+", args.time):
        raise LaunchError(f"--time={args.time!r} is not a Slurm time limit: write HH:MM:SS or D-HH:MM:SS")
    for e in args.env:
        if "=" not in e:
            raise LaunchError(f"--env={e!r} must be NAME=VALUE")
    train = parse_train_command(train_argv)
    devices = args.nodes * args.gpus_per_node
    check_fit(train, devices, f"{args.nodes} nodes x {args.gpus_per_node} GPUs")
    if train.workdir.startswith(NODE_LOCAL) and args.nodes > 1:
        warn(f"--workdir={train.workdir} looks node-local, but all {args.nodes} nodes write one checkpoint "
             f"together: unless it is shared on this cluster, use a shared filesystem path or a gs:// bucket")
    if not Path(args.log_dir).is_absolute():
        args.log_dir = str(REPO / args.log_dir)  # sbatch resolves relative paths against where it is called
    commit = git_commit()
    if git_dirty():
        warn("the job runs this checkout as it is on the shared filesystem, uncommitted changes included")
    script = render_script(args, train.with_flags(multihost=True), commit)
    path = Path(args.script or REPO / "slurm" / f"{args.job_name}.sbatch")
    runner = Runner(args.dry_run)
    if args.dry_run:
        runner.note(f"write {path}:")
        print(script, end="")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        print(f"wrote {path}")
    if args.no_submit:
        return 0
    runner.require_tool("sbatch", "run this on a Slurm login node (or pass --no_submit and copy the script)")
    runner.run(["sbatch", str(path)], f"submit the job ({args.nodes} nodes x {args.gpus_per_node} GPUs)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/slurm.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python launch/slurm.py --job_name=N --nodes=K [flags] -- "
                                      "python -m glmjax.train --config=... --workdir=...")
    p.add_argument("--job_name", help="Slurm job name")
    p.add_argument("--nodes", type=int, default=1, help="nodes; one JAX process per node (default 1)")
    p.add_argument("--gpus_per_node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--cpus_per_task", type=int, default=None, help="CPUs for each node's process (data pipeline)")
    p.add_argument("--time", default="24:00:00", help="time limit, HH:MM:SS or D-HH:MM:SS (default 24:00:00)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--python", default="python", help="Python on the nodes with glmjax installed (default python)")
    p.add_argument("--setup", default="", help="shell line run before srun, e.g. 'source venv/bin/activate'")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE exported for the job (repeatable)")
    p.add_argument("--log_dir", default="slurm/logs", help="where Slurm writes JOB_NAME-JOBID.out (default slurm/logs)")
    p.add_argument("--script", default=None, help="where to write the sbatch script (default slurm/JOB_NAME.sbatch)")
    p.add_argument("--no_requeue", action="store_true", help="do not requeue after a preemption")
    p.add_argument("--no_submit", action="store_true", help="write the script, do not call sbatch")
    p.add_argument("--dry_run", action="store_true", help="print the script and the sbatch command; write nothing")
    return p


if __name__ == "__main__":
    main_guard(main)
