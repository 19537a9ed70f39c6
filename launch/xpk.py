"""Run glmjax on GKE TPU node pools through XPK (``xpk workload create``), one command.

    python launch/xpk.py run --cluster=my-cluster --workload=glm1b --zone=us-east5-a --project=my-proj \\
        --accelerator=v5p-128 --spot --max_restarts=20 -- \\
        python -m glmjax.train --config=configs/glm_1b.py --workdir=gs://my-bucket/glm_1b --config.batch_size=256

XPK builds an image from ``--base_docker_image`` (default python:3.12) plus this repo (``--script-dir``)
unless ``--docker_image`` names a ready one, and runs the command in one pod per TPU host; JobSet restarts
the whole workload up to ``--max_restarts`` times after a preemption or a host failure, and the command
resumes from the latest checkpoint in the bucket. ``list`` and ``delete`` wrap ``xpk workload list|delete``.
``--dry_run`` prints the xpk commands and runs none. See docs/launch.md.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch.common import (  # noqa: E402
    REPO, LaunchError, Runner, check_fit, git_commit, git_dirty, main_guard, parse_accelerator, parse_train_command,
    dispatch, require, warn,
)

XPK_INSTALL = "install XPK with `pip install xpk` (it needs gcloud, kubectl and docker) and create a cluster first"


def _common(args) -> list[str]:
    require(args.cluster, "--cluster", "the GKE cluster made with `xpk cluster create`, e.g. --cluster=my-cluster")
    require(args.project, "--project", "the Google Cloud project, e.g. --project=my-project")
    require(args.zone, "--zone", "the cluster's zone, e.g. --zone=us-east5-a")
    return [f"--cluster={args.cluster}", f"--project={args.project}", f"--zone={args.zone}"]


def workload_command(train_args: list[str], *, install: bool) -> str:
    """What each pod runs: (install the repo into the image's Python, then) the training command."""
    train = f"python3 -m glmjax.train {shlex.join(train_args)}"
    return f"pip install --quiet -e . 'jax[tpu]' && {train}" if install else train


def cmd_run(args, train_argv) -> int:
    where = _common(args)
    require(args.workload, "--workload", "a name for the job, e.g. --workload=glm1b (lower case, digits, -)")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", args.workload):
        raise LaunchError(f"--workload={args.workload!r} is not a valid workload name: lower-case letters, digits and "
                          f"'-', starting with a letter, at most 40 characters")
    require(args.accelerator, "--accelerator", "the TPU slice type of a node pool of the cluster, e.g. v5p-128")
    if args.spot and args.flex:
        raise LaunchError("--spot and --flex are different capacity types: pick one")
    acc = parse_accelerator(args.accelerator)
    train = parse_train_command(train_argv)
    check_fit(train, acc.chips, acc.name)
    if not train.workdir.startswith("gs://"):
        raise LaunchError(f"--workdir={train.workdir} is a local path, but GKE pods keep nothing after a restart: "
                          f"use a bucket, e.g. --workdir=gs://BUCKET/{Path(train.workdir).name or 'run'}")
    runner = Runner(args.dry_run)
    if git_dirty() and not args.docker_image:
        warn("uncommitted changes in this checkout are copied into the image too (xpk copies --script-dir)")
    runner.note(f"{acc.name}: {acc.chips} chips, {acc.hosts} pods x {acc.chips_per_host} chips; commit "
                f"{git_commit()[:12]}")
    runner.require_tool("xpk", XPK_INSTALL)
    # --multihost: every pod is one JAX process; 75 = stopped early after saving, so JobSet must restart it
    command = workload_command(train.with_flags(multihost=acc.multihost), install=not args.docker_image)
    image = ([f"--docker-image={args.docker_image}"] if args.docker_image else
             [f"--base-docker-image={args.base_docker_image}", f"--script-dir={REPO}"])
    capacity = ["--spot"] if args.spot else ["--flex"] if args.flex else []
    restarts = [f"--max-restarts={args.max_restarts}"]
    if args.max_restarts > 0:
        restarts.append("--restart-on-user-code-failure")  # the exit status 75 after a preemption save
    runner.run(["xpk", "workload", "create", *where, f"--workload={args.workload}", f"--tpu-type={acc.name}",
                "--num-slices=1", *image, f"--command={command}", *restarts, *capacity,
                f"--priority={args.priority}"], f"create the workload {args.workload} on {args.cluster}")
    runner.note(f"follow it with: python launch/xpk.py list {' '.join(where)} --workload={args.workload}")
    return 0


def cmd_list(args, _) -> int:
    where = _common(args)
    runner = Runner(args.dry_run)
    runner.require_tool("xpk", XPK_INSTALL)
    job = [f"--filter-by-job={args.workload}"] if args.workload else []
    runner.run(["xpk", "workload", "list", *where, *job], "workloads on the cluster", check=False)
    return 0


def cmd_delete(args, _) -> int:
    where = _common(args)
    require(args.workload, "--workload", "the workload to delete, e.g. --workload=glm1b")
    runner = Runner(args.dry_run)
    runner.require_tool("xpk", XPK_INSTALL)
    runner.run(["xpk", "workload", "delete", *where, f"--workload={args.workload}"],
               f"delete the workload {args.workload} (the bucket workdir stays)")
    return 0


COMMANDS = {"run": cmd_run, "list": cmd_list, "delete": cmd_delete}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cluster", help="GKE cluster created with `xpk cluster create`")
    common.add_argument("--workload", help="workload (job) name")
    common.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"), help="Google Cloud project")
    common.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"), help="the cluster's zone")
    common.add_argument("--dry_run", action="store_true", help="print the xpk commands and run none")
    p = argparse.ArgumentParser(prog="python launch/xpk.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,list,delete}")
    run = sub.add_parser("run", parents=[common], help="create the workload",
                         usage="python launch/xpk.py run --cluster=C --workload=W --project=P --zone=Z "
                               "--accelerator=A [flags] -- python -m glmjax.train --config=... --workdir=gs://...")
    run.add_argument("--accelerator", help="TPU slice type of the node pool: v4-N, v5e-N, v5p-N, v6e-N")
    run.add_argument("--docker_image", default=None,
                     help="a ready image with glmjax and jax[tpu] installed (run from its working directory)")
    run.add_argument("--base_docker_image", default="python:3.12",
                     help="base image xpk adds this repo to when --docker_image is not given (default python:3.12); "
                          "each pod then pip-installs the repo at start (about a minute per restart)")
    run.add_argument("--max_restarts", type=int, default=10,
                     help="JobSet restarts after preemptions or failures (default 10; 0 = none)")
    run.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")
    run.add_argument("--flex", action="store_true", help="flex-start capacity (queued until available)")
    run.add_argument("--priority", default="medium", choices=["very-low", "low", "medium", "high", "very-high"],
                     help="Kueue priority (default medium)")
    sub.add_parser("list", parents=[common], help="workloads (or --workload) on the cluster")
    sub.add_parser("delete", parents=[common], help="delete --workload")
    return p


def main(argv) -> int:
    return dispatch(argv, build_parser, COMMANDS)


if __name__ == "__main__":
    main_guard(main)
