"""Run glmjax on a Cloud TPU slice (TPU VMs or a queued resource) with gcloud, one command.

    python launch/tpu.py run --name=glm1b --zone=us-east5-a --project=my-proj --accelerator=v5p-128 \\
        --spot --restart_on_preemption -- \\
        python -m glmjax.train --config=configs/glm_1b.py --workdir=gs://my-bucket/glm_1b --config.batch_size=256

``run`` checks the config against the slice (mesh, batch) and the workdir (multi-host needs gs://),
creates the slice if it does not exist, installs this repo at the local commit on every worker
(``--worker=all``), starts the training command on all workers with ``--multihost``, and streams
worker 0's log until training ends. With ``--restart_on_preemption`` it watches the slice: after a
preemption it deletes and re-creates it, installs again and re-runs the same command, which resumes
from the latest checkpoint in the bucket. ``--dry_run`` prints every command, in order, and runs none.

Other subcommands: ``create``, ``setup``, ``status``, ``logs [--worker=N] [--follow]``, ``stop``
(SIGTERM: training saves a checkpoint and exits), ``delete``. See docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    PREEMPTED_EXIT_CODE, REPO, LaunchError, Runner, check_fit, git_commit, git_dirty, main_guard,
    dispatch, parse_accelerator, parse_train_command, require, warn,
)
from launch.tpu_slice import GCLOUD_INSTALL, GONE, READY, RUN_DIR, Slice, status_script, stop_script  # noqa: E402


# ------------------------------------------------------------------------------------------ subcommands

def _validate_slice_args(args, need_accelerator: bool) -> None:
    require(args.name, "--name", "name the slice, e.g. --name=glm1b")
    require(args.project, "--project", "the Google Cloud project, e.g. --project=my-project",
            "`gcloud config get-value project` shows your default")
    require(args.zone, "--zone", "a zone that has the TPU generation, e.g. --zone=us-east5-a for v5p",
            "see https://cloud.google.com/tpu/docs/regions-zones")
    if need_accelerator:
        require(args.accelerator, "--accelerator", "the slice type, e.g. --accelerator=v5p-128")
        parse_accelerator(args.accelerator)


def _check_train(args, train_argv: list[str]):
    """The training command, checked against the slice before anything is created."""
    acc = parse_accelerator(args.accelerator)
    train = parse_train_command(train_argv)
    _, mesh = check_fit(train, acc.chips, acc.name)
    if not train.workdir.startswith("gs://"):
        if acc.multihost:
            raise LaunchError(f"--workdir={train.workdir} is a local path, but {acc.name} has {acc.hosts} hosts: "
                              f"all hosts write one checkpoint together and a re-created slice must find it; use "
                              f"a bucket, e.g. --workdir=gs://BUCKET/{Path(train.workdir).name or 'run'}")
        if args.restart_on_preemption:
            raise LaunchError(f"--workdir={train.workdir} is a local path: --restart_on_preemption re-creates the "
                              f"VM, whose disk is lost with the checkpoints; use --workdir=gs://BUCKET/...")
    return acc, train, mesh


def _preflight(runner: Runner, train, acc) -> None:
    """The AOT compile fit check for the real TPU topology (tools/aot_compile.py), before paying for a slice."""
    tool = REPO / "tools" / "aot_compile.py"
    if not tool.exists():
        raise LaunchError("--preflight needs tools/aot_compile.py (the ahead-of-time TPU compile and HBM check), "
                          "which this checkout does not have yet: update glmjax or drop --preflight")
    runner.run([sys.executable, str(tool), f"--config={train.config}", *train.overrides, f"--topology={acc.name}"],
               f"preflight: compile the train step for {acc.name} on this machine and check it fits HBM")


def cmd_run(args, train_argv: list[str]) -> int:
    _validate_slice_args(args, need_accelerator=True)
    acc, train, mesh = _check_train(args, train_argv)
    runner = Runner(args.dry_run)
    commit = git_commit()
    if git_dirty():
        warn("this checkout has uncommitted changes; only the commit is shipped: commit them to run them")
    runner.note(f"{acc.name}: {acc.chips} chips on {acc.hosts} hosts x {acc.chips_per_host}, topology "
                f"{acc.topology}, {acc.hbm_gib} GiB HBM per chip; mesh data={mesh[0]} fsdp={mesh[1]} "
                f"tensor={mesh[2]}; commit {commit[:12]}")
    if args.preflight:
        _preflight(runner, train, acc)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    tpu = Slice(args, runner)
    train_args = train.with_flags(multihost=acc.multihost)

    def bring_up(recreate: bool):
        if recreate:
            tpu.delete()
            tpu.create()
        else:
            tpu.ensure()
        tpu.setup(commit, args.python_version)

    bring_up(recreate=False)
    tpu.start(train_args)
    restarts = reattached = 0
    while True:
        code = tpu.stream()
        if runner.dry_run:
            if args.restart_on_preemption:
                runner.note(f"--restart_on_preemption: when the slice is preempted (or training exits with "
                            f"{PREEMPTED_EXIT_CODE} after saving), up to {args.max_restarts} times:")
                tpu.state()
                bring_up(recreate=True)
                tpu.start(train_args)
                tpu.stream()
            return 0
        if code == 0:
            runner.note(f"training finished on {tpu.name}; delete the slice with: python launch/tpu.py delete "
                        f"--name={tpu.name} --zone={tpu.zone} --project={tpu.project}{' --queued' if tpu.queued else ''}")
            return 0
        state = tpu.state()
        if code is None and state == READY and reattached < 10:
            reattached += 1
            runner.note("lost the connection to worker 0 but the slice is READY: re-attaching to the log")
            continue
        preempted = state in GONE or code == PREEMPTED_EXIT_CODE
        if not preempted:
            raise LaunchError(f"training exited with status {code} on {tpu.name} (slice {state}); its log: "
                              f"python launch/tpu.py logs --name={tpu.name} --zone={tpu.zone} --project={tpu.project}")
        if not args.restart_on_preemption:
            raise LaunchError(f"{tpu.name} was preempted (slice {state}, training status {code}); run the same "
                              f"command again to resume from the checkpoint, or pass --restart_on_preemption")
        restarts += 1
        if restarts > args.max_restarts:
            raise LaunchError(f"{tpu.name} was preempted {restarts} times, more than --max_restarts="
                              f"{args.max_restarts}: giving up (the checkpoint in {train.workdir} is kept)")
        runner.note(f"preempted (slice {state}, training status {code}): restart {restarts} of {args.max_restarts}")
        if state != READY:
            bring_up(recreate=True)
        tpu.start(train_args)


def cmd_create(args, _) -> int:
    _validate_slice_args(args, need_accelerator=True)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    Slice(args, runner).create()
    return 0


def cmd_setup(args, _) -> int:
    _validate_slice_args(args, need_accelerator=False)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    Slice(args, runner).setup(git_commit(), args.python_version)
    return 0


def cmd_status(args, _) -> int:
    _validate_slice_args(args, need_accelerator=False)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    tpu = Slice(args, runner)
    state = tpu.state(assume=READY)
    print(f"slice {tpu.name}: {state}", flush=True)
    if state == READY:
        tpu.ssh(status_script(), "training state on worker 0", worker="0", check=False)
    return 0


def cmd_logs(args, _) -> int:
    _validate_slice_args(args, need_accelerator=False)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    follow = "-F " if args.follow else ""
    Slice(args, runner).ssh(f"tail -n {args.lines} {follow}{RUN_DIR}/log", f"training log of worker {args.worker}",
                            worker=str(args.worker), check=False)
    return 0


def cmd_stop(args, _) -> int:
    _validate_slice_args(args, need_accelerator=False)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    Slice(args, runner).ssh(stop_script(), "SIGTERM to training on every worker (it saves a checkpoint and exits)")
    return 0


def cmd_delete(args, _) -> int:
    _validate_slice_args(args, need_accelerator=False)
    runner = Runner(args.dry_run)
    runner.require_tool("gcloud", GCLOUD_INSTALL)
    Slice(args, runner).delete()
    return 0


COMMANDS = {"create": cmd_create, "setup": cmd_setup, "run": cmd_run, "status": cmd_status, "logs": cmd_logs,
            "stop": cmd_stop, "delete": cmd_delete}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", help="name of the TPU VM slice (and of the queued resource with --queued)")
    common.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"), help="e.g. us-east5-a")
    common.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"), help="Google Cloud project")
    common.add_argument("--queued", action="store_true",
                        help="use a queued resource (waits for capacity instead of failing when none is free)")
    common.add_argument("--dry_run", action="store_true", help="print every command, in order, and run none")
    slice_flags = argparse.ArgumentParser(add_help=False)
    slice_flags.add_argument("--accelerator", help="slice type: v4-N, v5e-N (= v5litepod-N), v5p-N, v6e-N")
    slice_flags.add_argument("--version", default=None,
                             help="TPU VM runtime version (default per generation, e.g. v2-alpha-tpuv5 for v5p)")
    slice_flags.add_argument("--spot", action="store_true", help="Spot capacity: much cheaper, preemptible any time")
    install = argparse.ArgumentParser(add_help=False)
    install.add_argument("--python_version", default="3.12", help="Python of the venv on the workers (via uv)")

    p = argparse.ArgumentParser(prog="python launch/tpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    sub.add_parser("create", parents=[common, slice_flags], help="create the slice (waits until READY)")
    sub.add_parser("setup", parents=[common, install], help="install this repo at the local commit on every worker")
    run = sub.add_parser("run", parents=[common, slice_flags, install],
                         usage="python launch/tpu.py run --name=N --zone=Z --project=P --accelerator=A [flags] -- "
                               "python -m glmjax.train --config=... --workdir=gs://...",
                         help="create if needed, set up, train on all workers, stream worker 0's log")
    run.add_argument("--restart_on_preemption", action="store_true",
                     help="after a preemption re-create the slice and re-run the command (it resumes)")
    run.add_argument("--max_restarts", type=int, default=20, help="give up after this many restarts (default 20)")
    run.add_argument("--poll_seconds", type=int, default=30, help="seconds between state checks (default 30)")
    run.add_argument("--preflight", action="store_true",
                     help="first compile the train step for this TPU topology locally (tools/aot_compile.py) and "
                          "stop if it does not fit HBM")
    sub.add_parser("status", parents=[common], help="state of the slice and of training on worker 0")
    logs = sub.add_parser("logs", parents=[common], help="a worker's training log")
    logs.add_argument("--worker", type=int, default=0, help="worker index (default 0)")
    logs.add_argument("--lines", type=int, default=100, help="last lines to show (default 100)")
    logs.add_argument("--follow", action="store_true", help="keep printing new lines")
    sub.add_parser("stop", parents=[common], help="SIGTERM to training on all workers: it saves and exits")
    sub.add_parser("delete", parents=[common], help="delete the slice (the bucket workdir stays)")
    return p


def main(argv) -> int:
    return dispatch(argv, build_parser, COMMANDS)


if __name__ == "__main__":
    main_guard(main)
