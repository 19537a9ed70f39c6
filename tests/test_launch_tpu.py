"""launch/tpu.py (and the input checks of xpk.py / slurm.py): --dry_run prints exactly the golden gcloud
commands for v4-32, v5e-16, v5p-128 and v6e-256; a fake `gcloud` on PATH records the real invocations of a
preempt-then-restart run (the fake reports the slice PREEMPTED once); bad input fails before anything runs.

Regenerate the golden files after an intended change with GLMJAX_UPDATE_GOLDEN=1 (and read the diff)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
TRAIN = ["--", "python", "-m", "glmjax.train", "--config=configs/glm_1b.py", "--workdir=gs://my-bucket/glm_1b",
         "--config.batch_size=256"]
CASES = {"v4-32": [], "v5e-16": ["--spot"], "v5p-128": ["--queued", "--spot", "--restart_on_preemption"],
         "v6e-256": ["--spot", "--restart_on_preemption"]}


def launch(tool, *args, env=None, tmp=None):
    env = {**os.environ, **(env or {})}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return subprocess.run([sys.executable, f"launch/{tool}.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def commit():
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def normalise(text, tmp):
    c = commit()
    return text.replace(str(tmp), "<TMP>").replace(str(REPO), "<REPO>").replace(c, "<COMMIT>").replace(c[:12], "<COMMIT12>")


@pytest.mark.parametrize("accelerator", list(CASES))
def test_dry_run_prints_the_golden_gcloud_commands(accelerator, tmp_path):
    r = launch("tpu", "run", "--name=glm1b", "--zone=us-east5-a", "--project=my-proj", f"--accelerator={accelerator}",
               *CASES[accelerator], "--dry_run", *TRAIN, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    got = normalise(r.stdout, tmp_path)
    golden = GOLDEN / f"tpu_run_{accelerator}.txt"
    if os.environ.get("GLMJAX_UPDATE_GOLDEN"):
        golden.write_text(got)
    assert got == golden.read_text()


FAKE_GCLOUD = r"""#!{python}
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]
open(f"{{d}}/calls.jsonl", "a").write(json.dumps(argv) + "\n")
state_file = f"{{d}}/state"
state = open(state_file).read() if os.path.exists(state_file) else "NOT_FOUND"
verb = argv[3]
if verb == "describe":
    if state == "NOT_FOUND":
        sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: glm1b", file=sys.stderr) or 1)
    print(state)
elif verb == "create":
    open(state_file, "w").write("READY")
elif verb == "delete":
    open(state_file, "w").write("NOT_FOUND")
elif verb == "ssh" and any("GLMJAX_EXIT_CODE" in a for a in argv):  # worker 0's log stream
    n = len([1 for line in open(f"{{d}}/calls.jsonl") if "GLMJAX_EXIT_CODE" in line])
    print("train: step 3, loss 6.1")
    if n == 1:  # the slice is preempted while training: the ssh connection drops
        open(state_file, "w").write("PREEMPTED")
        sys.exit(255)
    print("train: step 12, loss 4.2")
    print("GLMJAX_EXIT_CODE=0")
"""


def test_fake_gcloud_preempted_once_then_restarted(tmp_path):
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (fakebin / "gcloud").chmod(0o755)
    env = {"PATH": f"{fakebin}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(tmp_path)}
    r = launch("tpu", "run", "--name=glm1b", "--zone=us-east5-a", "--project=my-proj", "--accelerator=v5p-128",
               "--spot", "--restart_on_preemption", "--poll_seconds=0", *TRAIN, env=env, tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]

    def kind(argv):
        verb = argv[3]
        if verb != "ssh":
            return verb
        cmd = next(a for a in argv if a.startswith("--command="))
        return "ssh:" + ("stream" if "GLMJAX_EXIT_CODE" in cmd else "install" if "uv pip install" in cmd else
                         "start" if "glmjax.train" in cmd else "?")

    bring_up = ["create", "describe", "scp", "ssh:install", "ssh:start", "ssh:stream"]
    assert [kind(c) for c in calls] == ["describe", *bring_up, "describe", "delete", *bring_up]
    assert all(c[:3] == ["compute", "tpus", "tpu-vm"] and "--zone=us-east5-a" in c and "--project=my-proj" in c
               for c in calls)
    create = calls[1]
    assert "--accelerator-type=v5p-128" in create and "--version=v2-alpha-tpuv5" in create and "--spot" in create
    start = next(a for a in calls[5] if a.startswith("--command="))
    assert "--worker=all" in calls[5] and "--multihost --preempted_exit_code=75" in start
    assert "--worker=0" in calls[6]
    assert "preempted (slice PREEMPTED" in r.stdout and "training finished" in r.stdout
    # the commit was really packed and shipped
    tar = Path(next(a for a in calls[3] if a.endswith(".tar.gz") and ":" not in a))
    assert tar.exists() and commit() in tar.name


BAD = [
    (["--accelerator=v9x-8"], "unknown accelerator 'v9x-8'"),
    (["--accelerator=v5p-100"], "v5p slices come in these sizes"),
    (["--accelerator=v5p-128", "--", "python", "-m", "glmjax.train", "--config=configs/glm_1b.py",
      "--workdir=gs://b/r"], "batch_size=96 is not divisible"),
    (["--accelerator=v5p-128", "--", "python", "-m", "glmjax.train", "--config=configs/glm_1b.py",
      "--workdir=gs://b/r", "--config.mesh.fsdp=128", "--config.batch_size=256"], "does not fit v5p-128 (64 devices)"),
    (["--accelerator=v5p-128", "--", "python", "-m", "glmjax.train", "--config=configs/glm_1b.py",
      "--workdir=/home/me/run", "--config.batch_size=256"], "is a local path, but v5p-128 has 16 hosts"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=["unknown", "size", "batch", "mesh", "local_workdir"])
def test_bad_input_fails_before_anything_runs(extra, message, tmp_path):
    flags, train = (extra[:extra.index("--")], extra[extra.index("--"):]) if "--" in extra else (extra, TRAIN)
    env = {"PATH": str(tmp_path)}  # no gcloud at all: nothing may be called
    r = subprocess.run([sys.executable, "launch/tpu.py", "run", "--name=n", "--zone=z", "--project=p", *flags,
                        *train], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("missing", ["--project", "--zone"])
def test_missing_project_or_zone(missing, tmp_path):
    flags = [f for f in ("--name=n", "--zone=z", "--project=p") if not f.startswith(missing)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    r = subprocess.run([sys.executable, "launch/tpu.py", "run", *flags, "--accelerator=v4-32", *TRAIN], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and f"missing {missing}" in r.stderr, r.stderr


def test_xpk_and_slurm_dry_runs_and_checks():
    r = launch("xpk", "run", "--cluster=c", "--workload=glm1b", "--project=p", "--zone=z", "--accelerator=v5p-128",
               "--spot", "--max_restarts=5", "--dry_run", *TRAIN)
    assert r.returncode == 0, r.stderr
    assert "xpk workload create --cluster=c --project=p --zone=z --workload=glm1b --tpu-type=v5p-128" in r.stdout
    assert "--max-restarts=5 --restart-on-user-code-failure --spot" in r.stdout and "--multihost" in r.stdout
    r = launch("xpk", "run", "--cluster=c", "--workload=glm1b", "--project=p", "--zone=z", "--accelerator=v5p-128",
               "--dry_run", "--", "python", "-m", "glmjax.train", "--config=configs/glm_1b.py", "--workdir=runs/x",
               "--config.batch_size=256")
    assert r.returncode == 2 and "GKE pods keep nothing" in r.stderr
    r = launch("slurm", "--job_name=j", "--nodes=2", "--gpus_per_node=8", "--dry_run", "--", "python", "-m",
               "glmjax.train", "--config=configs/glm_1b.py", "--workdir=/shared/x", "--config.mesh.tensor=32")
    assert r.returncode == 2 and "does not fit 2 nodes x 8 GPUs (16 devices)" in r.stderr
    r = launch("slurm", "--job_name=j", "--nodes=2", "--gpus_per_node=8", "--dry_run", *TRAIN[:4],
               "--config=configs/glm_1b.py", "--workdir=/shared/x")
    assert r.returncode == 0 and "#SBATCH --nodes=2" in r.stdout and "\nsbatch " in r.stdout


@pytest.mark.parametrize("tool", ["tpu", "xpk", "slurm"])
def test_help(tool):
    r = launch(tool, "--help")
    assert r.returncode == 0 and "usage" in r.stdout.lower()
