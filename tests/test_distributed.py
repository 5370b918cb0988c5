"""A 2-process CPU DDP pre-training (gloo) where one process dies or hangs ends the whole job with one clear line.

Each test runs the CLI through a small wrapper that makes one rank die (``os._exit(1)``) or hang at its
second loss computation; Fabric re-runs the same wrapper for rank 1, so the fault is armed there too.
"""

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import TINY_PRETRAIN

from swinssl.checkpoint import read_checkpoint

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

TIMEOUT_S = 60  # train.timeout_s when a process dies: the job must end well before it
HANG_TIMEOUT_S = 15  # train.timeout_s when a process hangs: the job ends after it
JOB_LIMIT_S = 150  # past this the job hangs: the test fails (and kills what it started)

WRAPPER = '''\
"""The swinssl CLI with a fault on one rank at one loss computation (FAULT_* variables)."""
import os
import sys
import time

from swinssl.methods import get_method
from swinssl.cli import main

rank = int(os.environ.get("LOCAL_RANK", "0"))
with open(os.path.join(os.environ["FAULT_PIDS"], f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
method = get_method("swin_unetr")
real_compute_losses, calls = method.compute_losses, 0


def compute_losses(*args, **kwargs):
    global calls
    calls += 1
    if rank == int(os.environ["FAULT_RANK"]) and calls == int(os.environ["FAULT_AT_CALL"]):
        if os.environ["FAULT_MODE"] == "hang":
            time.sleep(3600)
        os._exit(1)
    return real_compute_losses(*args, **kwargs)


method.compute_losses = compute_losses
sys.exit(main())
'''

TINY = [
    *TINY_PRETRAIN, "train.batch_size=1", "train.val_every=100", "train.preview_every=0", "train.checkpoint_every=1",
    "train.steps=3", "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp",
]


@dataclass
class Job:
    returncode: int
    stderr: str
    seconds: float  # until the main process (rank 0) exited
    run_dir: Path


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has ended; it only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def run_faulty_job(phantoms, tmp_path, rank: int, mode: str, timeout_s: int) -> Job:
    """Pre-train with a fault on ``rank`` at its 2nd loss computation (2nd step); wait for every process to end."""
    wrapper, pids, stderr_path = tmp_path / "faulty_swinssl.py", tmp_path / "pids", tmp_path / "stderr.txt"
    wrapper.write_text(WRAPPER)
    pids.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", FAULT_RANK=str(rank), FAULT_AT_CALL="2", FAULT_MODE=mode, FAULT_PIDS=str(pids))
    command = [sys.executable, str(wrapper), "pretrain", "--no-estimate", *TINY, f"data={phantoms}", f"train.out={tmp_path / 'runs'}",
               "train.name=fault", f"train.timeout_s={timeout_s}"]
    # stderr to a file, not a pipe: a process left behind would hold a pipe open and hang the reader.
    with open(stderr_path, "w") as stderr:
        start = time.monotonic()
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path)
        try:
            job.wait(timeout=JOB_LIMIT_S)
        except subprocess.TimeoutExpired:
            job.kill()
        seconds = time.monotonic() - start
        # A surviving rank notices a dead rank 0 at its next collective: give it a moment, not the timeout.
        ranks, deadline = {f.stem: int(f.read_text()) for f in pids.glob("rank*.pid")}, time.monotonic() + 20
        while any(running(pid) for pid in ranks.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [name for name, pid in ranks.items() if running(pid)]
        for name in left:
            os.kill(ranks[name], 9)
    assert seconds < JOB_LIMIT_S, f"the job hung ({JOB_LIMIT_S} s):\n{stderr_path.read_text()[-3000:]}"
    assert sorted(ranks) == ["rank0", "rank1"], "both ranks must have started"
    assert not left, f"processes left running: {left}"
    return Job(job.returncode, stderr_path.read_text(), seconds, tmp_path / "runs" / "fault")


def assert_checkpoint_intact(run_dir: Path) -> None:
    """The rank-0 checkpoint, where one was written before the fault, is whole and loadable."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        ckpt = read_checkpoint(last)
        assert ckpt["kind"] == "pretrain" and ckpt["step"] >= 1


def test_rank_1_dying_stops_the_job_with_its_exit_code(phantoms, tmp_path):
    job = run_faulty_job(phantoms, tmp_path, rank=1, mode="exit", timeout_s=TIMEOUT_S)
    # 4: rank 0 saw the lost peer (TrainingError); -9: Lightning's observer killed rank 0 just after our line.
    assert job.returncode in (4, -9), job.stderr
    assert re.search(r"error: distributed run: process 1 \(of 2\) stopped with exit code 1; "
                     r"the last good checkpoint is \S+last\.pt\n", job.stderr), job.stderr
    assert "Traceback" not in job.stderr
    assert job.seconds < TIMEOUT_S  # ended by the closed connection, not by the timeout
    assert_checkpoint_intact(job.run_dir)


@pytest.mark.slow  # make test-slow; rank 1 dying covers the default suite
def test_rank_0_dying_stops_the_surviving_rank(phantoms, tmp_path):
    job = run_faulty_job(phantoms, tmp_path, rank=0, mode="exit", timeout_s=TIMEOUT_S)
    assert job.returncode == 1, job.stderr  # rank 0's own exit code is the job's
    assert re.search(r"error: distributed run: process 1 \(of 2\) lost contact with the others \(.+\): one of them "
                     r"stopped, or hung longer than train\.timeout_s; the last good checkpoint is \S+last\.pt\n",
                     job.stderr), job.stderr
    assert "Traceback" not in job.stderr
    assert job.seconds < TIMEOUT_S
    assert_checkpoint_intact(job.run_dir)


@pytest.mark.slow  # make test-slow: waits out a 15 s timeout
def test_hung_rank_is_ended_after_the_timeout(phantoms, tmp_path):
    job = run_faulty_job(phantoms, tmp_path, rank=1, mode="hang", timeout_s=HANG_TIMEOUT_S)
    assert job.returncode == 4, job.stderr
    assert re.search(r"error: distributed run: process 0 \(of 2\) lost contact with the others \(Timed out[^)]*\): "
                     r"one of them stopped, or hung longer than train\.timeout_s; the last good checkpoint is \S+",
                     job.stderr), job.stderr
    assert "Traceback" not in job.stderr
    assert HANG_TIMEOUT_S <= job.seconds < HANG_TIMEOUT_S + JOB_LIMIT_S / 2
    assert_checkpoint_intact(job.run_dir)
