"""Killed runs: SIGKILL a CPU pre-training process (at a random moment, and in the middle of
writing a checkpoint), resume it, and end with the parameters of the uninterrupted run;
a checkpoint on disk is always whole."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_PRETRAIN

from swinssl.checkpoint import read_checkpoint

STEPS = 5
OVERRIDES = [*TINY_PRETRAIN, "train.batch_size=1", "train.val_every=100", "train.preview_every=100",
             "train.checkpoint_every=1", f"train.steps={STEPS}"]

# Runs the CLI; with SWINSSL_TEST_KILL_IN_SAVE=N the N-th checkpoint write stops halfway
# through the file with SIGKILL, as a crash or an OOM killer would.
RUNNER = """
import os, signal, sys
import torch
import swinssl.checkpoint as checkpoint

kill_at = int(os.environ.get("SWINSSL_TEST_KILL_IN_SAVE", "0"))
calls = {"n": 0}
real_save = torch.save

def save(obj, f, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == kill_at:
        real_save(obj, f, *args, **kwargs)
        f.flush()
        f.truncate(f.tell() // 2)  # half a file on disk, then the process is gone
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

checkpoint.torch.save = save
from swinssl.cli import app
sys.argv = ["swinssl", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Phantoms, the runner script, and the uninterrupted run: its final checkpoint and the
    seconds it ran after writing its first checkpoint (the window a random kill aims at)."""
    from swinssl.data.phantom import write_phantom_dataset

    root = tmp_path_factory.mktemp("interrupt")
    write_phantom_dataset(root / "data", cases=3, size=64, seed=1)
    runner = root / "runner.py"
    runner.write_text(RUNNER)
    process = subprocess.Popen(command(runner, root, "full"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=environment())
    first = wait_for_checkpoint(process, root / "runs" / "full")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    window = time.monotonic() - first
    return root, runner, read_checkpoint(root / "runs" / "full" / "checkpoints" / "last.pt"), window


def wait_for_checkpoint(process, run_dir) -> float:
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert last.exists(), "no checkpoint was written"
    return time.monotonic()


def command(runner, root, name, *extra):
    return [sys.executable, str(runner), "pretrain", "--no-estimate", f"data={root / 'data'}", f"train.out={root / 'runs'}",
            f"train.name={name}", *OVERRIDES, *extra]


def environment(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def cli(runner, root, name, *extra, **env):
    return subprocess.run(command(runner, root, name, *extra), capture_output=True, text=True, timeout=600,
                          env=environment(**env))


def resume(runner, root, name):
    return subprocess.run([sys.executable, str(runner), "pretrain", "--no-estimate", "--resume", str(root / "runs" / name)],
                          capture_output=True, text=True, timeout=600, env=environment())


def assert_same_parameters(run_dir, reference):
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ckpt["step"] == reference["step"] == STEPS
    for key, value in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][key], value, rtol=0, atol=1e-6, msg=key)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one_and_resumes_exactly(setup):
    root, runner, reference, window = setup
    killed = cli(runner, root, "cut_in_save", SWINSSL_TEST_KILL_IN_SAVE="3")
    assert killed.returncode == -signal.SIGKILL
    checkpoints = root / "runs" / "cut_in_save" / "checkpoints"
    leftovers = list(checkpoints.glob(".last.pt.*"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0  # the kill did land mid-write
    assert read_checkpoint(checkpoints / "last.pt")["step"] == 2  # the half-written step 3 never replaced it

    resumed = resume(runner, root, "cut_in_save")
    assert resumed.returncode == 0, resumed.stderr
    assert not list(checkpoints.glob(".last.pt.*"))  # the torn temporary is cleared on resume
    assert_same_parameters(root / "runs" / "cut_in_save", reference)


@pytest.mark.slow  # make test-slow; the kill mid-write runs by default
def test_kill_at_a_random_moment_then_resume_ends_like_the_uninterrupted_run(setup):
    root, runner, reference, window = setup
    seed = random.SystemRandom().randrange(2**31)
    delay = random.Random(seed).uniform(0.0, 0.9 * window)  # within steps 2..5 or their checkpoint writes
    process = subprocess.Popen(command(runner, root, "cut_random"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=environment())
    wait_for_checkpoint(process, root / "runs" / "cut_random")
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"
    last = root / "runs" / "cut_random" / "checkpoints" / "last.pt"
    print(f"killed {delay:.2f} s after the first checkpoint (seed {seed}); step on disk {read_checkpoint(last)['step']}")
    resumed = resume(runner, root, "cut_random")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_parameters(root / "runs" / "cut_random", reference)
