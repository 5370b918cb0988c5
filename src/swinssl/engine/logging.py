"""What a run shows as numbers: CSV metrics and TensorBoard scalars (figures: ``swinssl.plots``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping

from swinssl.runs import RunDir


class MetricLogger:
    """Appends ``step, split, name, value`` rows to ``metrics.csv`` and mirrors them to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.csv_path = RunDir(run_dir).metrics
        new = not self.csv_path.exists()
        self.file = open(self.csv_path, "a", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "split", "name", "value"])
        self.tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(RunDir(run_dir).tensorboard))

    def log(self, step: int, split: str, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.writerow([step, split, name, f"{value:.6g}"])
            if self.tb is not None:
                self.tb.add_scalar(f"{split}/{name}", value, step)
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
