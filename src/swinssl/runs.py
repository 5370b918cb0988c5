"""Run directories: the one place that names a run's files.

``<train.out>/<name>/``::

    config.yaml          the resolved config (what ``--resume`` reads)
    manifest.json        the data files with sizes and SHA-256
    environment.json     package versions, host, devices, command
    metrics.csv          step, split, name, value
    tensorboard/         the same scalars for TensorBoard
    previews/step_N.png  reconstructions (pre-training) or overlays (fine-tuning)
    checkpoints/last.pt  the latest state (resume continues from it)
    checkpoints/best.pt  fine-tuning: the best validation Dice (prediction prefers it)
    skipped.jsonl        pre-training: the bad volumes skipped, one {"file", "problem"} per line

A cross-validation (``finetune.fold=all``) is a parent folder of such runs::

    config.yaml          the resolved config, fold: all (what ``--resume`` reads)
    folds.json           the fold count, the fold runs and each fold's validation cases
    fold_0/ ... fold_K/  one fine-tuning run directory per fold

Written by the training engine (``engine.run_dir``), read by prediction, studies and the demo.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from swinssl.errors import CheckpointError
from swinssl.utils import Folder, atomic_write_text


@dataclass(frozen=True)
class RunDir(Folder):
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    def write_manifest(self, entries: dict[str, list[dict]]) -> str:
        """Write ``manifest.json`` (split -> [{case_id, modality, files: [{path, bytes, sha256}]}]); its SHA-256."""
        text = json.dumps(entries, indent=2)
        atomic_write_text(self.manifest, text)
        return hashlib.sha256(text.encode()).hexdigest()

    def read_manifest(self) -> dict[str, list[dict]]:
        """The data manifest: split -> its cases (``CheckpointError`` naming the file when unreadable)."""
        try:
            entries = json.loads(self.manifest.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{self.manifest}: unreadable data manifest ({err})") from None
        if not isinstance(entries, dict) or not all(isinstance(v, list) for v in entries.values()):
            raise CheckpointError(f"{self.manifest}: not a data manifest (split -> list of cases)")
        return entries

    @property
    def environment(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def skipped(self) -> Path:
        return self.path / "skipped.jsonl"

    def read_skipped(self) -> dict[str, str]:
        """The skipped volumes: file -> the problem (one line)."""
        if not self.skipped.is_file():
            return {}
        entries = {}
        for line in self.skipped.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                entry = json.loads(line)
                entries[entry["file"]] = entry["problem"]
        return entries

    def add_skipped(self, file: str, problem: str) -> None:
        """Append one skipped volume (one short write: the processes of a distributed run may append at once)."""
        with open(self.skipped, "a") as f:
            f.write(json.dumps({"file": file, "problem": problem}) + "\n")

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    def preview(self, step: int) -> Path:
        return self.path / "previews" / f"step_{step:07d}.png"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def folds(self) -> Path:
        """A cross-validation parent's list of its fold runs."""
        return self.path / "folds.json"

    def fold(self, index: int) -> Path:
        """The run directory of fold ``index`` of a cross-validation parent."""
        return self.path / f"fold_{index}"

    def stale_checkpoints(self) -> list[Path]:
        """Temporary files of checkpoint writes cut short by a kill (never renamed in)."""
        return sorted(self.checkpoints.glob(".*.tmp*"))


def resolve_checkpoint(source: str | Path, prefer_best: bool = True) -> Path:
    """The checkpoint file that ``source`` stands for.

    A file is itself; a run directory (or any folder holding the files, such as its
    ``checkpoints/``) gives ``best.pt`` if present and ``prefer_best``, else ``last.pt``.
    """
    path = Path(source).expanduser()
    if not path.is_dir():
        return path
    run = RunDir(path)
    names = ("best.pt", "last.pt") if prefer_best else ("last.pt",)
    for candidate in [run.checkpoints / n for n in names] + [path / n for n in names]:
        if candidate.is_file():
            return candidate
    wanted = "checkpoints/best.pt or checkpoints/last.pt" if prefer_best else "checkpoints/last.pt"
    raise CheckpointError(f"{path}: no {wanted} in this run directory")


def fold_runs(source: str | Path) -> list[Path] | None:
    """The fold run directories of a cross-validation parent folder (it holds ``folds.json``), else None."""
    run = RunDir(source)
    if not run.folds.is_file():
        return None
    try:
        listed = json.loads(run.folds.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{run.folds}: unreadable list of fold runs ({err})") from None
    return [run.path / name for name in listed]


def resolve_checkpoints(source: str | Path) -> list[Path]:
    """The checkpoints that ``source`` stands for in prediction: one per fold of a cross-validation
    parent folder (each fold's best.pt, else last.pt), else ``resolve_checkpoint(source)``."""
    runs = fold_runs(source)
    if runs is None:
        return [resolve_checkpoint(source)]
    return [_fold_checkpoint(source, run) for run in runs]


def _fold_checkpoint(parent: str | Path, run: Path) -> Path:
    if run.is_dir():
        with contextlib.suppress(CheckpointError):
            return resolve_checkpoint(run)
    # An ensemble short of a fold would be another model than the one cross-validated.
    raise CheckpointError(f"{parent}: {run.name} has no checkpoint yet; finish the folds with "
                          f"swinssl finetune --resume {parent}")


def probe_curve(rows: list[dict]) -> tuple[dict[int, float], float | None]:
    """A pre-training's logged probe, from its metrics rows (``read_metrics``): {step:
    ``probe_dice``} and ``probe_dice_random`` (None for a run without the probe)."""
    curve = {r["step"]: r["value"] for r in rows if r["name"] == "probe_dice"}
    return curve, next((r["value"] for r in rows if r["name"] == "probe_dice_random"), None)


def read_metrics(run_dir: Path) -> list[dict]:
    with open(RunDir(run_dir).metrics, newline="") as f:
        return [{**row, "step": int(row["step"]), "value": float(row["value"])} for row in csv.DictReader(f)]
