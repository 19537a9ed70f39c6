"""What the launchers share: the TPU accelerator table, the training command, the fit check, a runner.

- :func:`parse_accelerator` knows v4, v5e (``v5litepod``), v5p and v6e slices: chips, hosts, chips per
  host, topology, the TPU VM runtime version and HBM per chip.
- :func:`parse_train_command` reads ``python -m glmjax.train --config=... --workdir=... [--config.x=y]``
  (or just its flags) and :func:`check_fit` loads that config and checks its mesh and batch against the
  number of devices of the target, before anything is created.
- :class:`Runner` runs external commands (gcloud, xpk, sbatch), or with ``dry_run`` prints each one,
  in order, under a ``# what it does`` line, and runs none.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREEMPTED_EXIT_CODE = 75  # what the training command exits with when it stopped early to be resumed


class LaunchError(Exception):
    """A user-caused problem, found before anything is created. The message says what, why and the fix."""


# ------------------------------------------------------------------------------------------ accelerators

@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # the gcloud / xpk accelerator type, e.g. v5litepod-16
    generation: str  # v4 | v5e | v5p | v6e
    chips: int  # = JAX devices (v4 and v5p: one device per chip, megacore)
    hosts: int
    chips_per_host: int
    topology: str
    runtime_version: str  # TPU VM software version for `gcloud ... create --version`
    hbm_gib: int  # per chip

    @property
    def multihost(self) -> bool:
        return self.hosts > 1


# generation -> (gcloud prefix, TensorCores per chip (the number in the name counts cores), runtime, HBM GiB,
#                topologies of the standard slice sizes)
_GENERATIONS = {
    "v4": ("v4", 2, "tpu-ubuntu2204-base", 32,
           ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12", "8x8x16", "8x16x16")),
    "v5p": ("v5p", 2, "v2-alpha-tpuv5", 95,
            ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16", "8x16x16",
             "16x16x16", "16x16x24")),
    "v5e": ("v5litepod", 1, "v2-alpha-tpuv5-lite", 16, ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
    "v6e": ("v6e", 1, "v2-alpha-tpuv6e", 32, ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")),
}
_ALIASES = {"v4": "v4", "v5p": "v5p", "v5e": "v5e", "v5litepod": "v5e", "v6e": "v6e"}
MAX_SINGLE_HOST_CHIPS = 8  # v5e / v6e slices of up to 8 chips are one VM; larger ones are 4 chips per VM


def _build_table() -> dict[str, Accelerator]:
    table = {}
    for gen, (prefix, cores, runtime, hbm, topologies) in _GENERATIONS.items():
        for topology in topologies:
            chips = math.prod(int(x) for x in topology.split("x"))
            per_host = chips if (cores == 1 and chips <= MAX_SINGLE_HOST_CHIPS) else min(chips, 4)
            name = f"{prefix}-{chips * cores}"
            table[name] = Accelerator(name, gen, chips, chips // per_host, per_host, topology, runtime, hbm)
    return table


ACCELERATORS = _build_table()


def parse_accelerator(text: str) -> Accelerator:
    """``v5p-128`` / ``v5e-16`` / ``v5litepod-16`` / ``v6e-256`` / ``v4-32`` -> its :class:`Accelerator`."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", (text or "").strip().lower())
    if not m:
        raise LaunchError(f"unknown accelerator {text!r}: write GENERATION-SIZE with a generation among v4, "
                          f"v5e (alias v5litepod), v5p, v6e, e.g. --accelerator=v5p-128 (the number counts "
                          f"TensorCores on v4/v5p, i.e. 2 per chip, and chips on v5e/v6e)")
    gen = _ALIASES[m.group(1)]
    name = f"{_GENERATIONS[gen][0]}-{int(m.group(2))}"
    if name not in ACCELERATORS:
        sizes = ", ".join(a.name for a in ACCELERATORS.values() if a.generation == gen)
        raise LaunchError(f"unknown accelerator {text!r}: {gen} slices come in these sizes: {sizes}")
    return ACCELERATORS[name]


# ------------------------------------------------------------------------------------------ training command

@dataclasses.dataclass
class TrainCommand:
    """The flags of ``python -m glmjax.train`` as the user gave them (the launchers add their own)."""
    args: list[str]
    config: str
    workdir: str

    @property
    def overrides(self) -> list[str]:
        return [a for a in self.args if a.startswith("--config.")]

    def flag(self, name: str) -> str | None:
        return _flag_value(self.args, name)

    def with_flags(self, *, multihost: bool, preempted_exit_code: int | None = PREEMPTED_EXIT_CODE) -> list[str]:
        """The training flags plus ``--multihost`` and ``--preempted_exit_code`` unless already given."""
        args = list(self.args)
        if multihost and "--multihost" not in args:
            args.append("--multihost")
        if preempted_exit_code is not None and self.flag("--preempted_exit_code") is None:
            args.append(f"--preempted_exit_code={preempted_exit_code}")
        return args


def _flag_value(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


def split_command(argv: list[str]) -> tuple[list[str], list[str]]:
    """Launcher flags before ``--``, the training command after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse_train_command(argv: list[str]) -> TrainCommand:
    usage = ("put the training command after `--`, e.g. `-- python -m glmjax.train --config=configs/glm_1b.py "
             "--workdir=gs://BUCKET/run` (or only its flags)")
    if not argv:
        raise LaunchError(f"no training command: {usage}")
    args = list(argv)
    if args[0] in ("python", "python3") or args[0].endswith(("/python", "/python3")):
        if args[1:3] != ["-m", "glmjax.train"]:
            raise LaunchError(f"the training command must run `-m glmjax.train`, got {shlex.join(argv)!r}: {usage}")
        args = args[3:]
    elif not args[0].startswith("--"):
        raise LaunchError(f"cannot read the training command {shlex.join(argv)!r}: {usage}")
    for flag in ("--coordinator_address", "--num_processes", "--process_id"):
        if _flag_value(args, flag) is not None:
            raise LaunchError(f"{flag} is set by the cluster, not by you: the launcher starts one process per host "
                              f"with --multihost (jax.distributed auto-detection); remove {flag}")
    config, workdir = _flag_value(args, "--config"), _flag_value(args, "--workdir")
    if not config or not workdir:
        raise LaunchError(f"the training command needs --config and --workdir: {usage}")
    return TrainCommand(args, config, workdir)


def check_fit(train: TrainCommand, num_devices: int, target: str):
    """Load the run's config and check it against ``num_devices``; returns ``(cfg, (data, fsdp, tensor))``."""
    from glmjax.config import ConfigError, load_config, resolve_mesh_shape, validate

    path = train.config
    if not os.path.isabs(path) and not os.path.exists(path) and (REPO / path).exists():
        path = str(REPO / path)  # the command runs from the repo root on the hosts
    try:
        cfg = load_config(path, train.overrides)
        validate(cfg, num_devices)
        mesh = resolve_mesh_shape(cfg, num_devices)
    except ConfigError as e:
        raise LaunchError(f"--config={train.config} does not fit {target} ({num_devices} devices): {e}") from None
    return cfg, mesh


def require(value, flag: str, example: str, hint: str = "") -> str:
    if not value:
        raise LaunchError(f"missing {flag}: {example}{'; ' + hint if hint else ''}")
    return value


# ------------------------------------------------------------------------------------------ git

def git_commit(repo: Path = REPO) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise LaunchError(f"{repo} is not a git checkout ({e}): the launcher ships the repo at its commit; "
                          "clone it with git") from None
    return out.stdout.strip()


def git_dirty(repo: Path = REPO) -> bool:
    out = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True)
    return bool(out.stdout.strip())


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ running commands

class Runner:
    """Runs commands, or (``dry_run``) prints each under ``# what`` and runs none."""

    def __init__(self, dry_run: bool, out=None):
        self.dry_run = dry_run
        self.out = out or sys.stdout

    def _show(self, what: str, argv: list[str]) -> None:
        if self.dry_run:
            print(f"# {what}\n{shlex.join(argv)}", file=self.out, flush=True)
        else:
            print(f"==> {what}\n    $ {shlex.join(argv)}", file=self.out, flush=True)

    def note(self, text: str) -> None:
        print(f"# {text}" if self.dry_run else f"==> {text}", file=self.out, flush=True)

    def require_tool(self, tool: str, install: str) -> None:
        if not self.dry_run and shutil.which(tool) is None:
            raise LaunchError(f"`{tool}` is not on PATH: {install}")

    def run(self, argv: list[str], what: str, *, check: bool = True) -> int:
        self._show(what, argv)
        if self.dry_run:
            return 0
        rc = subprocess.run(argv).returncode
        if check and rc != 0:
            raise LaunchError(f"{what} failed (exit status {rc}): {shlex.join(argv)}")
        return rc

    def capture(self, argv: list[str], what: str, dry_result: str = "") -> tuple[int, str, str]:
        """(exit status, stdout, stderr) of ``argv``; in a dry run ``(0, dry_result, "")``."""
        self._show(what, argv)
        if self.dry_run:
            return 0, dry_result, ""
        r = subprocess.run(argv, capture_output=True, text=True)
        return r.returncode, r.stdout.strip(), r.stderr.strip()

    def stream(self, argv: list[str], what: str, on_line) -> int:
        """Runs ``argv``, printing its output line by line (``on_line`` sees each line first)."""
        self._show(what, argv)
        if self.dry_run:
            return 0
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as p:
            for line in p.stdout:
                if on_line(line.rstrip("\n")) is not False:
                    print(line, end="", file=self.out, flush=True)
        return p.returncode

    def sleep(self, seconds: float) -> None:
        if not self.dry_run:
            time.sleep(seconds)


def main_guard(fn, argv=None) -> None:
    """Run a launcher's ``fn(argv)``; a :class:`LaunchError` becomes ``error: ...`` and exit status 2."""
    try:
        sys.exit(fn(sys.argv[1:] if argv is None else argv) or 0)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing more is started; what runs remotely keeps running "
              "(see the launcher's status / stop commands)", file=sys.stderr)
        sys.exit(130)



def dispatch(argv, build_parser, commands) -> int:
    """Parse ``FLAGS -- TRAIN_COMMAND`` and run the chosen subcommand (only ``run`` takes a command)."""
    flags, train_argv = split_command(argv)
    args = build_parser().parse_args(flags)
    if train_argv and args.command != "run":
        raise LaunchError(f"only `run` takes a training command after --; `{args.command}` does not")
    return commands[args.command](args, train_argv)
