"""One Cloud TPU slice (TPU VMs or the queued resource holding them) driven through gcloud, and the
shell scripts ``launch/tpu.py`` runs on its workers (install, start, stream, status, stop)."""
from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from launch.common import REPO, LaunchError, Runner, parse_accelerator, warn

REMOTE_REPO = "$HOME/glmjax"
REMOTE_VENV = "$HOME/glmjax-venv"
RUN_DIR = "$HOME/glmjax_run"
EXIT_MARKER = "GLMJAX_EXIT_CODE="
READY = "READY"
GONE = {"PREEMPTED", "TERMINATED", "STOPPED", "SUSPENDED", "SUSPENDING", "FAILED", "NOT_FOUND"}
GCLOUD_INSTALL = "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`"


# ------------------------------------------------------------------------------------------ remote scripts

def setup_script(commit: str, python_version: str) -> str:
    """Unpack the shipped commit into ~/glmjax and install it (with jax[tpu]) into a venv; skipped if current."""
    uv = "$HOME/.local/bin/uv"
    return " && ".join([
        f'if [ "$(cat {REMOTE_REPO}/COMMIT 2>/dev/null)" = {commit} ]; then echo "glmjax {commit[:12]} is installed"; '
        f"exit 0; fi",
        f"rm -rf {REMOTE_REPO}", f"mkdir -p {REMOTE_REPO}", f"tar xzf $HOME/glmjax-{commit}.tar.gz -C {REMOTE_REPO}",
        "python3 -m pip install --user --quiet uv",
        f"{uv} venv --quiet --allow-existing --python {python_version} {REMOTE_VENV}",
        f"{uv} pip install --quiet --python {REMOTE_VENV}/bin/python -e {REMOTE_REPO} 'jax[tpu]'",
        f"echo {commit} > {REMOTE_REPO}/COMMIT",
    ])


def start_script(train_args: list[str]) -> str:
    """Start training in the background on a worker (refused if one runs); pid, log, exit code in ~/glmjax_run."""
    inner = (f"{REMOTE_VENV}/bin/python -m glmjax.train {shlex.join(train_args)} > {RUN_DIR}/log 2>&1 & "
             f"echo $! > {RUN_DIR}/pid; wait $!; echo $? > {RUN_DIR}/exit_code")
    return (f"mkdir -p {RUN_DIR} && cd {RUN_DIR} || exit 1; "
            f'if [ -f pid ] && kill -0 "$(cat pid)" 2>/dev/null; then echo "glmjax is already training here '
            f'(pid $(cat pid)): stop it first with launch/tpu.py stop" >&2; exit 3; fi; '
            f"rm -f exit_code; if [ -f log ]; then mv log log.$(date +%Y%m%d-%H%M%S); fi; "
            f"cd {REMOTE_REPO} || exit 1; nohup bash -c {shlex.quote(inner)} > /dev/null 2>&1 < /dev/null &")


def stream_script() -> str:
    """Print worker 0's log as it grows; when training has ended, print its exit status after a marker."""
    return (f"cd {RUN_DIR} && while [ ! -f log ]; do sleep 1; done; tail -n +1 -F log & T=$!; "
            f"while [ ! -f exit_code ]; do sleep 5; done; sleep 2; kill $T; echo {EXIT_MARKER}$(cat exit_code)")


def status_script() -> str:
    return (f"if [ -f {RUN_DIR}/exit_code ]; then echo \"training: finished, exit status $(cat {RUN_DIR}/exit_code)\"; "
            f'elif [ -f {RUN_DIR}/pid ] && kill -0 "$(cat {RUN_DIR}/pid)" 2>/dev/null; then '
            f'echo "training: running (pid $(cat {RUN_DIR}/pid))"; tail -n 3 {RUN_DIR}/log; '
            f'else echo "training: not running"; fi; echo "installed commit: $(cat {REMOTE_REPO}/COMMIT 2>/dev/null)"')


def stop_script() -> str:
    return (f'if [ -f {RUN_DIR}/pid ] && kill -0 "$(cat {RUN_DIR}/pid)" 2>/dev/null; then '
            f'kill -TERM "$(cat {RUN_DIR}/pid)" && echo "sent SIGTERM to $(cat {RUN_DIR}/pid)"; '
            f'else echo "not training"; fi')


# ------------------------------------------------------------------------------------------ the slice

class Slice:
    """One TPU VM slice (or the queued resource holding it, ``--queued``), driven through gcloud."""

    def __init__(self, args, runner: Runner):
        self.name, self.zone, self.project = args.name, args.zone, args.project
        self.queued, self.spot = args.queued, args.spot
        self.acc = parse_accelerator(args.accelerator) if getattr(args, "accelerator", None) else None
        self.version = args.version or (self.acc.runtime_version if self.acc else None)
        self.poll_seconds = getattr(args, "poll_seconds", 30)
        self.r = runner

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    def _vm(self, verb: str, *rest: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, self.name, *self._where(), *rest]

    def _qr(self, verb: str, *rest: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.name, *self._where(), *rest]

    def ssh(self, command: str, what: str, worker: str = "all", check: bool = True) -> int:
        return self.r.run(self._vm("ssh", f"--worker={worker}", f"--command={command}"), what, check=check)

    def state(self, assume: str = "NOT_FOUND") -> str:
        """READY, a waiting state (CREATING, WAITING_FOR_RESOURCES, ...) or one of GONE; ``assume`` in a dry run."""
        if self.queued:
            argv, what = self._qr("describe", "--format=value(state.state)"), "state of the queued resource"
        else:
            argv, what = self._vm("describe", "--format=value(state)"), "state of the TPU VM"
        for attempt in range(3):
            rc, out, err = self.r.capture(argv, what, dry_result=assume)
            if rc == 0:
                return {"ACTIVE": READY}.get(out, out) if self.queued else out
            if "NOT_FOUND" in err or "not found" in err.lower():
                return "NOT_FOUND"
            warn(f"could not read the state of {self.name} (attempt {attempt + 1} of 3): {err[-300:]}")
            self.r.sleep(self.poll_seconds)
        raise LaunchError(f"gcloud cannot describe {self.name} in {self.zone} / {self.project}: {err[-500:]}")

    def create(self) -> None:
        acc = self.acc
        spot = ["--spot"] if self.spot else []
        if self.queued:
            self.r.run(self._qr("create", f"--node-id={self.name}", f"--accelerator-type={acc.name}",
                                f"--runtime-version={self.version}", *spot),
                       f"request {acc.name} as a queued resource ({acc.hosts} hosts x {acc.chips_per_host} chips)")
        else:
            self.r.run(self._vm("create", f"--accelerator-type={acc.name}", f"--version={self.version}", *spot),
                       f"create the TPU VM slice {acc.name} ({acc.hosts} hosts x {acc.chips_per_host} chips, "
                       f"topology {acc.topology})")
        self.wait_ready()

    def delete(self) -> None:
        if self.queued:
            self.r.run(self._qr("delete", "--force", "--quiet"), "delete the queued resource and its TPU VMs")
        else:
            self.r.run(self._vm("delete", "--quiet"), "delete the TPU VM slice")

    def wait_ready(self) -> None:
        waited = 0
        while True:
            state = self.state(assume=READY)
            if state == READY:
                return
            if state in GONE and not (self.queued and state == "NOT_FOUND" and waited == 0):
                raise LaunchError(f"{self.name} is {state} instead of becoming READY: see `gcloud compute tpus "
                                  f"{'queued-resources' if self.queued else 'tpu-vm'} describe {self.name} "
                                  f"--zone={self.zone} --project={self.project}`")
            self.r.note(f"{self.name} is {state} (waited {waited // 60} min); checking again in {self.poll_seconds} s")
            self.r.sleep(self.poll_seconds)
            waited += self.poll_seconds

    def ensure(self) -> None:
        """Create the slice unless it is READY (a preempted one is deleted first)."""
        state = self.state()
        if self.r.dry_run:
            self.r.note("(dry run: assuming the slice does not exist yet)")
        if state == READY:
            self.r.note(f"{self.name} exists and is READY: reusing it")
            return
        if state == "NOT_FOUND":
            self.create()
        elif state in GONE:
            self.delete()
            self.create()
        else:
            self.wait_ready()

    def setup(self, commit: str, python_version: str) -> None:
        """Ship ``git archive`` of the commit to every worker and install it there."""
        tar = Path(tempfile.gettempdir()) / "glmjax-launch" / f"glmjax-{commit}.tar.gz"
        if not self.r.dry_run:
            tar.parent.mkdir(parents=True, exist_ok=True)
        self.r.run(["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={tar}", commit],
                   f"pack this repo at commit {commit[:12]}")
        self.r.run(["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tar), f"{self.name}:glmjax-{commit}.tar.gz",
                    *self._where(), "--worker=all"], "copy it to every worker")
        self.ssh(setup_script(commit, python_version), "install it on every worker (skipped where it is current)")

    def start(self, train_args: list[str]) -> None:
        self.ssh(start_script(train_args), "start training on every worker (in the background)")

    def stream(self) -> int | None:
        """Worker 0's log until training ends: its exit status, or None if the connection was lost."""
        code = []

        def on_line(line):
            if line.startswith(EXIT_MARKER):
                code.append(int(line[len(EXIT_MARKER):] or -1))
                return False
            return True

        self.r.stream(self._vm("ssh", "--worker=0", f"--command={stream_script()}"),
                      "stream worker 0's training log until training ends", on_line)
        return code[-1] if code else None
