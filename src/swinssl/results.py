"""Result folders: the one module that names, writes and reads what prediction, evaluation, the demo
and the studies leave behind (training runs are ``swinssl.runs``; checkpoints ``swinssl.checkpoint``).

- A prediction folder (``swinssl predict --out``): the masks and ``predictions.json``, which
  records input -> mask, the models, the class names and the options (``PredictionFolder``);
  under ``.predict/`` one record per case (``<name>.json``: its input, its mask file and the
  fingerprint of the model and options that made it, or its error), from which a resumed or
  split prediction knows what is done and ``predictions.json`` is assembled.
- An evaluation folder (``swinssl evaluate --out``, by default the prediction folder):
  ``metrics.csv``, one row per case and class (``case_id, class, class_name, dice, hd95, nsd``),
  and ``summary.json`` (``EvaluationFolder``).
- A workflow's folder (the demo, a study): ``results.json``, ``{"kind": ..., ...}``, whose ``kind``
  says which workflow wrote it (``write_results`` / ``read_results``).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from swinssl.errors import DataError
from swinssl.utils import Folder, atomic_write_text

SCORE_COLUMNS = ("dice", "hd95", "nsd")
CSV_COLUMNS = ("case_id", "class", "class_name", *SCORE_COLUMNS)
RESULTS = "results.json"


@dataclass(frozen=True)
class PredictionFolder(Folder):
    """A prediction folder: ``<name><suffix>`` masks, ``predictions.json`` and ``.predict/``.

    Each case's record (``.predict/<name>.json``: ``{"source", "resolved_source", "mask",
    "fingerprint"}``, or ``"error"`` in place of ``"mask"`` for a case that failed) is written
    after its mask, atomically, so a mask without a record is one whose process stopped in
    between. ``predictions.json`` is assembled from the records under an exclusive lock
    (``.predict/lock``, ``fcntl.flock``), so processes predicting parts of one input list into
    one folder each leave it listing every case done so far.
    """

    @property
    def record_file(self) -> Path:
        return self.path / "predictions.json"

    @property
    def case_records(self) -> Path:
        return self.path / ".predict"

    def case_record_file(self, name: str) -> Path:
        return self.case_records / f"{name}.json"

    def write_case(self, name: str, source: Path, fingerprint: str, mask: str | None = None,
                   error: str | None = None) -> Path:
        """The record of case ``name``: its input ``source`` and ``mask`` (a file name in this folder)
        or its ``error``, made by ``fingerprint``."""
        record = {"source": str(source), "resolved_source": str(Path(source).resolve()), "fingerprint": fingerprint}
        record.update({"mask": mask} if error is None else {"error": error})
        path = self.case_record_file(name)
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        return path

    def read_case(self, name: str) -> dict[str, Any] | None:
        """The record of case ``name``; None when absent or unreadable (the case is then not done)."""
        try:
            record = json.loads(self.case_record_file(name).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def assemble_record(self, model: str, checkpoints: Sequence[Path], labels: Mapping[str, str], options: dict,
                        names: Sequence[str], fingerprint: str, failed_inputs: Mapping[str, str]) -> Path:
        """``predictions.json`` from the records of cases ``names`` made by ``fingerprint`` (each mask
        still present, or each error) and ``failed_inputs`` (input -> reason), under the folder's lock."""
        with self._locked():
            written, failed = {}, dict(failed_inputs)
            for name in names:
                record = self.read_case(name)
                if record is None or record.get("fingerprint") != fingerprint:
                    continue
                if "error" in record:
                    failed[record["source"]] = record["error"]
                elif record.get("mask") and (self.path / record["mask"]).is_file():
                    written[record["source"]] = str(self.path / record["mask"])
            return self.write_record(model, checkpoints, labels, options, written, failed)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.case_records.mkdir(parents=True, exist_ok=True)
        with open(self.case_records / "lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
            yield

    def exists(self) -> bool:
        return self.record_file.is_file()

    def write_record(self, model: str, checkpoints: Sequence[Path], labels: Mapping[str, str], options: dict,
                     written: Mapping[str, str], failed: Mapping[str, str]) -> Path:
        """``predictions.json``: enough to know later which models and options made which file."""
        record = {
            "model": model,
            "checkpoint": str(Path(checkpoints[0]).resolve()),
            "models": [str(Path(c).resolve()) for c in checkpoints],  # every model averaged; one without an ensemble
            "labels": dict(labels),
            "options": options,
            "predictions": dict(written),
            "failed": dict(failed),
        }
        atomic_write_text(self.record_file, json.dumps(record, indent=2) + "\n")
        return self.record_file

    def read_record(self) -> dict[str, Any]:
        """The record (``DataError`` naming the file when it is no prediction record)."""
        try:
            record = json.loads(self.record_file.read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.record_file}: unreadable ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("predictions"), dict):
            raise DataError(f"{self.record_file}: no 'predictions' mapping of input -> mask")
        return record


@dataclass(frozen=True)
class EvaluationFolder(Folder):
    @property
    def metrics(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def write(self, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: row[k] for k in CSV_COLUMNS} for row in rows)
        atomic_write_text(self.metrics, buffer.getvalue())
        atomic_write_text(self.summary, json.dumps(summary, indent=2) + "\n")

    def read_scores(self) -> list[dict[str, Any]] | None:
        """The rows of ``metrics.csv`` (class an int, scores floats), or None when there is none."""
        path = self.metrics
        if not path.is_file():
            return None
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = set(CSV_COLUMNS) - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path}: not an evaluation's metrics.csv (no column {', '.join(sorted(missing))})")
            try:
                return [{"case_id": r["case_id"], "class": int(r["class"]), "class_name": r["class_name"],
                         **{m: float(r[m]) for m in SCORE_COLUMNS}} for r in reader]
            except (TypeError, ValueError) as err:
                raise DataError(f"{path}: unreadable row ({err})") from None

    def case_dice(self) -> dict[str, float]:
        """Each case's mean Dice over the evaluated (foreground) classes."""
        rows = self.read_scores()
        if rows is None:
            raise DataError(f"{self.metrics}: no evaluation here (swinssl evaluate writes it)")
        per_case: dict[str, list[float]] = {}
        for row in rows:
            per_case.setdefault(row["case_id"], []).append(row["dice"])
        return {case: sum(v) / len(v) for case, v in per_case.items()}

    def read_summary(self) -> dict | None:
        """``summary.json``, or None where missing or unreadable."""
        try:
            data = json.loads(self.summary.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


def write_results(folder: str | Path, kind: str, data: Mapping[str, Any]) -> Path:
    """``results.json`` of a workflow's folder: ``{"kind": kind, **data}``."""
    path = Path(folder) / RESULTS
    atomic_write_text(path, json.dumps({"kind": kind, **data}, indent=2) + "\n")
    return path


def read_results(folder: str | Path) -> dict[str, Any] | None:
    """A workflow folder's ``results.json`` (None without one); ``DataError`` naming it when unreadable."""
    path = Path(folder) / RESULTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
        raise DataError(f"{path}: no 'kind' (written by an older swinssl; run the workflow again)")
    return data
