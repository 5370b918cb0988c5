"""Creating and resuming run directories: everything needed to understand, reproduce and resume
a run. The files are named by ``swinssl.runs.RunDir``."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

import swinssl
from swinssl.config import load_config, save_config
from swinssl.data.checksums import source_bytes, source_checksums
from swinssl.data.discover import Case
from swinssl.engine.data import checksum_memo
from swinssl.engine.distributed import launched_as_rank_zero
from swinssl.checkpoint import Checkpoint
from swinssl.errors import ConfigError
from swinssl.runs import RunDir
from swinssl.utils import atomic_write_text, writable_dir

PACKAGES = ("torch", "monai", "lightning-fabric", "numpy", "nibabel", "itk-io", "pynrrd", "pydicom")


def new_run_dir(out: str | Path, name: str, method: str) -> Path:
    """Create a fresh run directory; refuses to reuse an existing non-empty one (resume instead)."""
    name = name or f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(out) / name
    if path.is_dir() and any(path.iterdir()):
        raise ConfigError(f"{path}: run directory exists; pass --resume {path} to continue it, or another train.name")
    return writable_dir(path)


def write_manifest(path: Path, splits: dict[str, Sequence[Case]], memo: Path | None = None) -> str:
    """List every data file with size and SHA-256; returns the manifest's own SHA-256.

    Checksums come from the memo folder ``memo`` (``swinssl.data.checksums``): only new or changed
    files are read, in parallel threads."""
    sources = [f for cases in splits.values() for case in cases for f in _files(case)]
    digests = source_checksums(sources, memo)
    entries = {split: [{"case_id": case.case_id, "modality": case.modality,
                        "files": [{"path": str(f), "bytes": source_bytes(f), "sha256": digests[str(f)]}
                                  for f in _files(case)]}
                       for case in cases]
               for split, cases in splits.items()}
    return RunDir(path).write_manifest(entries)


def _files(case: Case) -> list[Path]:
    return [*case.images, *([case.label] if case.label else [])]


def write_environment(path: Path) -> None:
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    env = {
        "swinssl": swinssl.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available() and [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": versions,
        "command": sys.argv,
    }
    atomic_write_text(RunDir(path).environment, json.dumps(env, indent=2))


def write_run_files(path: Path, cfg, splits: dict[str, Sequence[Case]]) -> str:
    save_config(cfg, RunDir(path).config)
    write_environment(path)
    return write_manifest(path, splits, checksum_memo(cfg))


def resume_state(resume: str | Path, overrides: Sequence[str] = ()) -> tuple[Any, Checkpoint | None]:
    """The saved config of run directory ``resume`` (plus overrides) and its last checkpoint, if any."""
    run = RunDir(resume)
    if not run.config.is_file():
        raise ConfigError(f"{run.path}: not a run directory (no config.yaml)")
    cfg = load_config(run.config, overrides)
    for stale in run.stale_checkpoints():
        stale.unlink(missing_ok=True)
    return cfg, Checkpoint.load(run.last) if run.last.is_file() else None


def open_folds_dir(cfg, kind: str, validation: dict[str, list[str]]) -> Path:
    """The parent folder of a cross-validation (``swinssl.runs`` names its files), new.

    The first process creates it and writes ``config.yaml`` and ``folds.json`` (the fold runs and
    each fold's validation case ids); the processes a launcher started only learn its path, so it
    must not depend on the clock: several processes need ``train.name``.
    """
    t = cfg.train
    if t.devices * t.num_nodes > 1 and not t.name:
        raise ConfigError("train.name: every fold of a multi-process cross-validation trains into one folder; "
                          "name it (train.name=NAME)")
    if not launched_as_rank_zero():
        return Path(t.out) / t.name
    path = new_run_dir(t.out, t.name, kind)
    run = RunDir(path)
    save_config(cfg, run.config)
    # Written last: a folder with folds.json is a complete cross-validation parent.
    folds = {"folds": len(validation), "runs": list(validation), "validation": validation}
    atomic_write_text(run.folds, json.dumps(folds, indent=2) + "\n")
    return path


def open_run_dir(fabric, cfg, kind: str, resume: str | Path | None, state: Checkpoint | None,
                 splits: dict[str, Sequence[Case]]) -> tuple[Path, str | None]:
    """The run directory (new, or ``resume``) and the data manifest's hash.

    Rank 0 names and creates a new directory and writes its files; the others learn both.
    """
    if resume is not None:
        run_dir = Path(resume)
    else:
        run_dir = new_run_dir(cfg.train.out, cfg.train.name, kind) if fabric.is_global_zero else None
        run_dir = Path(fabric.broadcast(str(run_dir) if run_dir else None))
    manifest = None
    if fabric.is_global_zero and state is None:
        manifest = write_run_files(run_dir, cfg, splits)
    return run_dir, fabric.broadcast(manifest)
