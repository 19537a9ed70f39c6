"""Backends of the sweep runner: what starts one job of a plan and reports its exit status.

A backend has ``start(job, plan_dir, log_path) -> Handle``; a handle has ``poll()`` (the exit status, or
None while it runs) and ``terminate()`` (ask it to save and stop). ``concurrent`` says whether several
of its jobs may run at once. The launch/ issue adds TPU and Slurm backends with the same two methods.

* ``LocalBackend`` (``--backend=local``): ``python -m glmjax.train --config=CONFIG --workdir=WORKDIR`` as a
  subprocess in the plan directory, its output appended to the job's log file.
* ``InProcessBackend`` (``--backend=inprocess``): :func:`glmjax.train.loop.train` inside this process,
  one job at a time (``start`` returns when the job ends), logs and the job's progress bar to its log
  file. It saves each job's process start-up (imports, the tokenizer, the data set-up: ~10-20 s on a
  2-core CPU), which for tiny models costs more than the training; an exception fails that job only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys

class Handle:
    """A started job: ``poll()`` -> exit status or None while it runs; ``terminate()`` asks it to stop."""

    def poll(self) -> int | None:
        raise NotImplementedError

    def terminate(self) -> None:
        raise NotImplementedError


class Backend:
    """Starts one job of a plan. ``job`` is the plan's dict (``name, workdir, config_file, steps, ...``)."""

    name = "abstract"
    concurrent = True

    def start(self, job: dict, plan_dir: str, log_path: str) -> Handle:
        raise NotImplementedError


class _Popen(Handle):
    def __init__(self, proc: subprocess.Popen, log):
        self.proc, self.log = proc, log

    def poll(self):
        rc = self.proc.poll()
        if rc is not None and not self.log.closed:
            self.log.close()
        return rc

    def terminate(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the loop saves at the next step and exits


class LocalBackend(Backend):
    """``python -m glmjax.train --config=CONFIG --workdir=WORKDIR`` in the plan directory, output to a log."""

    name = "local"

    def __init__(self, python: str = sys.executable, env: dict | None = None, extra_args=(),
                 module: str = "glmjax.train"):
        self.python, self.env, self.extra_args, self.module = python, env, list(extra_args), module

    def command(self, job: dict) -> list[str]:
        return [self.python, "-m", self.module, f"--config={job['config_file']}", f"--workdir={job['workdir']}",
                *self.extra_args]

    def start(self, job, plan_dir, log_path):
        log = open(log_path, "a")
        log.write(f"$ {' '.join(self.command(job))}\n")
        log.flush()
        env = dict(os.environ if self.env is None else self.env)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(self.command(job), cwd=plan_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        return _Popen(proc, log)


class _Finished(Handle):
    def __init__(self, rc: int):
        self.rc = rc

    def poll(self):
        return self.rc

    def terminate(self):
        pass


class InProcessBackend(Backend):
    """Train the job here and now (blocking); exit status 0 when it returned, 1 when it raised."""

    name = "inprocess"
    concurrent = False

    def start(self, job, plan_dir, log_path):
        from glmjax.config import load_config
        from glmjax.train.loop import train

        cwd = os.getcwd()
        ours = logging.getLogger("glmjax")  # the job's own lines go to its log file, not the console
        with open(log_path, "a") as log, contextlib.redirect_stderr(log):  # the job's progress bar too
            handler = logging.StreamHandler(log)
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            saved = (ours.level, ours.propagate)
            ours.addHandler(handler)
            ours.setLevel(logging.INFO)
            ours.propagate = False
            old_term = signal.getsignal(signal.SIGTERM)
            try:
                os.chdir(plan_dir)
                cfg = load_config(job["config_file"])
                result = train(cfg, job["workdir"])
                logging.getLogger("glmjax.train").info("done: step %s", result.get("step"))
                return _Finished(0)
            except Exception:  # noqa: BLE001 -- one job's failure is reported, the sweep goes on
                logging.getLogger("glmjax.scaling").exception("job %s failed", job["name"])
                return _Finished(1)
            finally:
                os.chdir(cwd)
                signal.signal(signal.SIGTERM, old_term)
                ours.removeHandler(handler)
                ours.level, ours.propagate = saved


BACKENDS = {"local": LocalBackend, "inprocess": InProcessBackend}
