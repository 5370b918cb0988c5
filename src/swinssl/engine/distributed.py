"""When one process of a multi-process run fails: end the whole run soon, with one line.

A process that dies (a crash, the OOM killer) or hangs must end the run, leave no process
behind, and say what happened. The others notice at their next collective: a dead peer at
once (its connection closes), a hung one after ``train.timeout_s``. ``DistributedFaults``
wraps a stage's training steps; a single-process run is left as it is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from swinssl.errors import TrainingError

END_GRACE_S = 2.0  # how long the launching process lets the processes it started end on their own before killing them


class DistributedFaults:
    """``with DistributedFaults(fabric, last_checkpoint):`` around the training steps of a run.

    - A collective that fails because another process died or hung becomes a ``TrainingError``
      saying which process stopped (when known) and naming the last good checkpoint.
    - The process that started the others (Fabric's subprocess launcher, local rank 0), when it
      leaves with any error, ends those still running: a hung one never would on its own.
    - Lightning's child-process observer SIGKILLs the launching process when a started one exits
      with an error (it polls every 5 s, so it wins while this process is busy away from
      collectives, e.g. validating). Its log line becomes the same one-line error; while this
      process is already reporting an error of its own, the observer is held so that this report
      and its exit code go through.

    A single-process run is left as it is.
    """

    def __init__(self, fabric, last_checkpoint: Path):
        import threading

        self.fabric, self.last_checkpoint = fabric, Path(last_checkpoint)
        self.launcher = getattr(fabric.strategy, "launcher", None)
        self.children = list(getattr(self.launcher, "procs", []))  # started here; child i is local rank i + 1
        self.report_lock = threading.Lock()
        self.reported = False

    def __enter__(self) -> "DistributedFaults":
        if self.children:
            import logging

            # The observer logs with its module's logger just before it kills this process.
            self.observer_log = logging.getLogger(type(self.launcher).__module__)
            self.observer_log.addFilter(self)
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if err is None:
            if self.children:
                self.observer_log.removeFilter(self)
            return False
        if self.children and not self.claim_report():
            time.sleep(5)  # the observer has reported this failure and is killing this process
        stopped = self.end_children()
        if self.fabric.world_size > 1 and is_peer_failure(err):
            raise TrainingError(self.message(stopped, err)) from err
        return False  # any other error goes on as it is

    def filter(self, record) -> bool:
        """Called by Lightning's observer thread: say in one line why it is about to kill this process."""
        if "terminated with code" not in record.getMessage():
            return True  # another message of that module: not ours to replace
        if not self.claim_report():
            while True:  # this process reports its own error and exits, which ends this daemon thread
                time.sleep(60)
        print(f"error: {self.message(self.stopped_children(), None)}", file=sys.stderr, flush=True)
        return False  # instead of Lightning's line

    def claim_report(self) -> bool:
        """True for the first of (this process's own error, the observer) to report; the other stays quiet."""
        with self.report_lock:
            first, self.reported = not self.reported, True
        return first

    def stopped_children(self) -> list[tuple[int, int]]:
        """(global rank, exit code) of each started process that has ended with an error."""
        return [(self.fabric.global_rank + i + 1, p.returncode) for i, p in enumerate(self.children)
                if p.poll() not in (None, 0)]

    def end_children(self) -> list[tuple[int, int]]:
        """Let the started processes end on their own for a moment, then kill the rest; returns
        those that ended with an error on their own (``stopped_children``)."""
        deadline = time.monotonic() + END_GRACE_S
        while any(p.poll() is None for p in self.children) and time.monotonic() < deadline:
            time.sleep(0.05)
        stopped = self.stopped_children()
        for p in self.children:
            if p.poll() is None:
                p.kill()  # SIGKILL: a process stuck in a collective ignores SIGTERM
                p.wait()
        return stopped

    def message(self, stopped: list[tuple[int, int]], err: BaseException | None) -> str:
        world = self.fabric.world_size
        if stopped:
            what = "; ".join(f"process {rank} (of {world}) {exit_description(code)}" for rank, code in stopped)
        else:
            what = (f"process {self.fabric.global_rank} (of {world}) lost contact with the others "
                    f"({peer_failure_reason(err)}): one of them stopped, or hung longer than train.timeout_s")
        kept = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint.is_file()
                else "no checkpoint was written yet")
        return f"distributed run: {what}; {kept}"


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process died, hung or dropped its connection.

    torch raises many of these (e.g. from DDP's forward) as a plain RuntimeError that quotes gloo or NCCL.
    """
    from swinssl.errors import SwinsslError

    if isinstance(err, SwinsslError) or not isinstance(err, Exception):
        return False
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err).lower()
    return ("gloo" in text or "nccl" in text) and any(
        mark in text for mark in ("by peer", "timed out", "broken pipe", "connection"))


def peer_failure_reason(err: BaseException | None) -> str:
    """The backend's own words, without its source location and advice: 'Connection closed by peer [...]:port'."""
    lines = str(err or "").strip().splitlines() or ["unknown reason"]
    text = lines[0]
    if text.startswith("[") and "] " in text:  # "[.../gloo/transport/tcp/pair.cc:553] Connection closed by ..."
        text = text.split("] ", 1)[1]
    return text.split(". ")[0].rstrip(".")


def exit_description(code: int) -> str:
    """'stopped with exit code 1' or, for a signal (e.g. the OOM killer's), 'was killed (SIGKILL)'."""
    if code >= 0:
        return f"stopped with exit code {code}"
    import signal

    try:
        return f"was killed ({signal.Signals(-code).name})"
    except ValueError:
        return f"was killed (signal {-code})"


def launched_as_rank_zero() -> bool:
    """Before Fabric starts in this process: whether it is the one that writes files shared by all.

    A process that torchrun or Fabric's launcher started has its ranks in its environment; the
    process a user started has none (and is rank 0).
    """
    import os

    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))
