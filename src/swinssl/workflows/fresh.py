"""Run a function in a fresh Python process: ``python -m swinssl.workflows.fresh MODULE:FUNCTION JSON``.

Workflows that need a process of their own use it: the estimate, to measure a stage's peak memory
in a process that ran nothing else; the demo, to fine-tune its two arms at once, each with its
own threads. The function takes the JSON payload (a dict) and returns something JSON can hold;
``FreshProcess.result`` returns it, or raises ``FreshProcessFailed`` in one line: the function's
own ``SwinsslError`` (with its exit code), an allocation that failed, a signal that killed the
process, or the last line the process wrote to stderr. Whatever the function prints goes to the
process's stderr, kept in a file: stdout carries only the result.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from swinssl.errors import SwinsslError

SOURCE = str(Path(__file__).resolve().parents[2])  # the folder holding the swinssl package


class FreshProcessFailed(SwinsslError):
    """A fresh process did not return a result; ``out_of_memory`` says whether memory ran out."""

    exit_code = 4

    def __init__(self, message: str, out_of_memory: bool = False, exit_code: int | None = None):
        super().__init__(message)
        self.out_of_memory = out_of_memory
        if exit_code is not None:
            self.exit_code = exit_code


class FreshProcess:
    """``target`` (``"module:function"``) called with ``payload`` in a new Python process, started at once.
    ``threads``: torch's intra-op threads there (None: torch's default)."""

    def __init__(self, target: str, payload: dict, threads: int | None = None, env: dict | None = None):
        self.target = target
        self.stderr = tempfile.TemporaryFile(mode="w+")
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join([SOURCE, *filter(None, [environment.get("PYTHONPATH")])])
        spec = json.dumps({"target": target, "payload": payload, "threads": threads})
        self.process = subprocess.Popen([sys.executable, "-m", "swinssl.workflows.fresh", spec],
                                        stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=environment,
                                        cwd=os.getcwd())

    def done(self) -> bool:
        return self.process.poll() is not None

    def result(self):
        """Wait for the process and return the function's result (``FreshProcessFailed`` otherwise)."""
        stdout, _ = self.process.communicate()
        self.stderr.seek(0)
        stderr = self.stderr.read()
        self.stderr.close()
        lines = stdout.strip().splitlines()
        answer = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
        code = self.process.returncode
        if code == 0 and answer is not None and "error" not in answer:
            return answer["result"]
        if answer is not None and "error" in answer:
            raise FreshProcessFailed(answer["error"], out_of_memory=answer.get("out_of_memory", False),
                                     exit_code=answer.get("exit_code"))
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            raise FreshProcessFailed(f"the process running {self.target} was killed ({name}), most likely by the "
                                     "system for want of memory", out_of_memory=code == -signal.SIGKILL)
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        failed = FreshProcessFailed(f"the process running {self.target} failed (exit code {code}): {last}")
        failed.worker_traceback = stderr  # --debug shows it
        raise failed


def run_fresh(target: str, payload: dict, threads: int | None = None, env: dict | None = None):
    """``FreshProcess(...).result()``: call ``target`` with ``payload`` in a new process and wait."""
    return FreshProcess(target, payload, threads, env).result()


def main(argv: list[str]) -> int:
    """The fresh process: call the function, print ``{"result": ...}`` (or ``{"error": ...}``) as stdout's last line."""
    from swinssl.engine.memory import is_out_of_memory

    spec = json.loads(argv[0])
    module, name = spec["target"].split(":")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the function's own prints; stdout is the result's
            if spec.get("threads"):
                import torch

                torch.set_num_threads(spec["threads"])
            answer = {"result": getattr(importlib.import_module(module), name)(spec["payload"])}
    except SwinsslError as err:
        answer = {"error": str(err), "exit_code": err.exit_code, "out_of_memory": str(err).startswith("out of memory")}
    except Exception as err:  # noqa: BLE001 - an allocation failure is reported in one line; others keep their traceback
        if not is_out_of_memory(err):
            raise
        answer = {"error": f"out of memory: {str(err).splitlines()[0]}", "out_of_memory": True}
    print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
