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

Written by the training engine (``engine.run_dir``), read by prediction, studies and the demo.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from swinssl.errors import CheckpointError


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.json"

    @property
    def environment(self) -> Path:
        return self.path / "environment.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

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
