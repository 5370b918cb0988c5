"""What a report shows, gathered from a folder: plain data, no HTML (``report.page`` renders it).

The folder's kind is read from its files:

- a prediction folder: ``predictions.json`` (``swinssl predict``); its labels come from ``labels``
  or from the evaluation beside it (``summary.json``), its scores from that evaluation's
  ``metrics.csv`` (or are computed here when labels are known and no evaluation is); with
  ``labels``, also a bare folder of masks (``<case_id>.nii.gz``, e.g. another tool's), whose images
  come from the labels' dataset;
- a training run: ``config.yaml`` and ``metrics.csv`` (``swinssl pretrain`` / ``finetune``);
- a cross-validation: ``folds.json`` (its folds are runs);
- the demo or a study: ``report.md`` (``swinssl demo`` / ``swinssl study``); its prediction
  folders become the viewer's layers, its run folders the curves, its PNGs and results the summary.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swinssl.checkpoint import CheckpointHead, read_head
from swinssl.data.discover import find_dataset, is_volume_file, volume_stem
from swinssl.errors import CheckpointError, DataError
from swinssl.results import RESULTS, EvaluationFolder, PredictionFolder, read_results
from swinssl.runs import RunDir

EXPECTED = ("predictions.json (a prediction folder; a folder of masks needs --labels), config.yaml and metrics.csv "
            "(a training run), folds.json (a cross-validation) or report.md (a demo or study folder)")


@dataclass
class Layer:
    """One mask over a case's image: its label, or a prediction (named after its folder)."""

    name: str
    path: Path | None  # None: not found (``problem`` says why)
    problem: str = ""


@dataclass
class Case:
    case_id: str
    image: Path | None  # None: not found (``problem`` says why)
    layers: list[Layer] = field(default_factory=list)
    problem: str = ""


@dataclass
class Run:
    """A training run: its curves, previews and provenance."""

    name: str
    path: Path
    kind: str  # "pre-training" | "fine-tuning"
    metrics: list[dict[str, Any]]  # rows of metrics.csv: step, split, name, value
    previews: list[Path]
    config: str  # config.yaml as written
    plan: dict[str, Any] | None  # the checkpoint's plan
    checkpoint: Path | None
    step: int | None  # the checkpoint's step
    environment: dict[str, Any] | None
    manifest_sha256: str | None  # sha256 of manifest.json (the hash the plan records)
    manifest_files: dict[str, int]  # split -> number of cases in the manifest
    notes: list[str] = field(default_factory=list)


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Report:
    source: Path
    kind: str  # prediction folder | pre-training run | fine-tuning run | cross-validation | demo | study
    classes: dict[int, str] = field(default_factory=dict)  # foreground class -> name
    cases: list[Case] = field(default_factory=list)
    scores: list[dict[str, Any]] = field(default_factory=list)  # case_id, layer, class, class_name, dice, hd95, nsd
    runs: list[Run] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)  # sentences shown first
    tables: list[Table] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)  # PNGs of a demo or study folder
    text: str = ""  # a demo's or study's report.md
    notes: list[str] = field(default_factory=list)  # what could not be found or shown

    @property
    def title(self) -> str:
        return f"swinssl {self.kind}: {self.source.name or self.source}"


def collect(path: str | Path, labels: str | Path | None = None, evaluation: str | Path | None = None) -> Report:
    """Everything the report of ``path`` shows (see the module docstring for the kinds of folder).

    ``labels``: a dataset (dataset.json, nnU-Net raw folder) or folder of label files for a prediction
    folder's cases; ``evaluation``: the folder holding its ``metrics.csv`` and ``summary.json``
    (default: the prediction folder). Raises ``DataError`` naming ``path`` when it is no folder of a
    known kind.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such folder")
    if not path.is_dir():
        raise DataError(f"{path}: expected a folder holding {EXPECTED}")
    labels = Path(labels).expanduser() if labels is not None else None
    if labels is not None and not labels.exists():
        raise DataError(f"{labels}: no such dataset or folder of labels")
    run = RunDir(path)
    if PredictionFolder(path).exists() or (labels is not None and _volume_files(path)):
        report = Report(path, "prediction folder")
        _add_predictions(report, path, "prediction", labels, Path(evaluation) if evaluation else path)
    elif run.config.is_file() and run.metrics.is_file():
        one = read_run(path)
        report = Report(path, f"{one.kind} run", runs=[one])
    elif run.folds.is_file():
        report = Report(path, "cross-validation", runs=[read_run(p) for p in _subfolders(path) if _is_run(p)])
    elif (path / "report.md").is_file():
        report = _collection(path, labels)
    else:
        raise DataError(f"{path}: not a folder swinssl report knows; expected {EXPECTED}")
    report.classes = dict(sorted(report.classes.items()))
    return report


# --- prediction folders ------------------------------------------------------------------------------


def _add_predictions(report: Report, folder: Path, layer: str, labels: Path | None, evaluation: Path) -> None:
    """Add one prediction folder's masks to the report's cases (one layer each), with its label
    layer where the labels are known, and its scores."""
    record, masks = _read_masks(folder)
    labels, label_by_id, images_by_id = _find_labels(report, folder, labels, evaluation)
    failed = record.get("failed") if isinstance(record.get("failed"), dict) else {}
    if failed:
        report.notes.append(f"{folder.name}: {len(failed)} input(s) had no mask written "
                            f"(e.g. {next(iter(failed.values()))})")
    plan_labels = record.get("labels") if isinstance(record.get("labels"), dict) else {}
    for key, name in plan_labels.items():  # the model's plan names its classes too
        if str(key).isdigit() and int(key) != 0:
            report.classes.setdefault(int(key), str(name))

    by_image = {_case_key(c): c for c in report.cases}
    for source, target in masks:
        mask = folder / Path(str(target)).name  # predict writes every mask into its folder
        if not mask.is_file():
            mask = _locate(target, folder) or mask
        case_id = volume_stem(mask)
        image = _locate(source, folder) or images_by_id.get(case_id)
        key = str(image.resolve()) if image else f"id:{case_id}"
        case = by_image.get(key)
        if case is None:
            problem = "" if image else f"image not found: {source or f'no image of {case_id} in the labels'}"
            case = by_image[key] = Case(case_id, image, problem=problem)
            report.cases.append(case)
        if labels is not None and not any(lay.name == "label" for lay in case.layers):
            label = label_by_id.get(case_id)
            case.layers.insert(0, Layer("label", label, "" if label else f"no label for {case_id} in {labels}"))
        case.layers.append(Layer(layer, mask if mask.is_file() else None,
                                 "" if mask.is_file() else f"mask not found: {mask}"))

    rows = EvaluationFolder(evaluation).read_scores()
    if rows is None and labels is not None:
        try:
            rows = _score_now(folder, labels)
            report.notes.append(f"{folder.name}: scores computed for this report (no metrics.csv in {evaluation})")
        except DataError as err:
            report.notes.append(f"{folder.name}: no scores ({err})")
    for row in rows or []:
        report.scores.append({**row, "layer": layer})
        report.classes.setdefault(int(row["class"]), row["class_name"])


def _read_masks(folder: Path) -> tuple[dict, list[tuple[str, str]]]:
    """A prediction folder's record and its (input, mask) pairs as recorded; a bare folder of masks
    has no record and no inputs (its images are found in the labels' dataset by case id)."""
    predictions = PredictionFolder(folder)
    if not predictions.exists():
        return {}, [("", str(p)) for p in _volume_files(folder)]
    record = predictions.read_record()
    return record, list(record["predictions"].items())


def _find_labels(report: Report, folder: Path, labels: Path | None,
                 evaluation: Path) -> tuple[Path | None, dict[str, Path], dict[str, Path]]:
    """The labels of a prediction folder's cases: (their dataset or folder, case id -> label file,
    case id -> image file), from ``labels`` (its problems are the user's to fix) or else from the
    evaluation's summary.json (shown where still readable; a note otherwise). Adds the class names."""
    from swinssl.metrics import label_files

    if labels is None:
        summary = EvaluationFolder(evaluation).read_summary()
        if not summary or not summary.get("labels"):
            report.notes.append(f"{folder.name}: no labels (pass --labels DATASET, or evaluate the folder first)")
            return None, {}, {}
        try:
            labels = _locate(summary["labels"], folder)
            if labels is None:
                raise DataError(f"{summary['labels']}: not found")
            return _find_labels(report, folder, labels, evaluation)
        except DataError as err:
            report.notes.append(f"{folder.name}: the labels its evaluation used are not shown ({err}); pass "
                                "--labels DATASET")
            return None, {}, {}
    label_by_id, names = label_files(labels)
    report.classes.update({int(c): n for c, n in names.items() if int(c) != 0})
    return labels, label_by_id, _dataset_images(labels)


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p))


def _case_key(case: Case) -> str:
    return str(case.image.resolve()) if case.image else f"id:{case.case_id}"


def _dataset_images(labels: Path) -> dict[str, Path]:
    """Case id -> first image file of a dataset (dataset.json or nnU-Net raw folder); empty for a
    plain folder of label files."""
    if labels.is_file() or (labels / "dataset.json").is_file():
        return {c.case_id: c.images[0] for c in find_dataset(labels).cases}
    return {}


def _score_now(folder: Path, labels: Path) -> list[dict[str, Any]] | None:
    """Evaluate a prediction folder that has none (``swinssl.metrics.evaluate`` into a scratch folder)."""
    from swinssl.metrics import evaluate

    with tempfile.TemporaryDirectory() as scratch:
        evaluate(folder, labels, out_dir=scratch)
        return EvaluationFolder(scratch).read_scores()


def _locate(recorded: Any, folder: Path) -> Path | None:
    """A path as a record wrote it: absolute, or relative to the folder the command ran in, which
    may be any folder above ``folder`` (``swinssl demo --out runs/demo`` records ``runs/demo/...``)."""
    if not recorded:
        return None
    path = Path(str(recorded)).expanduser()
    if path.is_absolute():
        return path if path.exists() else None
    for base in (folder, *folder.resolve().parents, Path.cwd()):
        if (base / path).exists():
            return base / path
    return None


# --- runs ----------------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    run = RunDir(path)
    return run.config.is_file() and run.metrics.is_file()


def read_run(path: Path) -> Run:
    """A training run directory's curves, previews and provenance (``swinssl.runs`` names its files)."""
    from swinssl.runs import read_metrics

    run = RunDir(path)
    notes = []
    try:
        metrics = read_metrics(path)
    except (OSError, KeyError, TypeError, ValueError) as err:
        metrics = []
        notes.append(f"{run.metrics}: unreadable ({err}); no curves")
    checkpoint = next((p for p in (run.best, run.last) if p.is_file()), None)
    ckpt = CheckpointHead()
    if checkpoint is not None:
        try:
            ckpt = read_head(checkpoint)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: the report goes on without its plan
            notes.append(f"{checkpoint}: unreadable ({type(err).__name__}); no plan shown")
    else:
        notes.append(f"{run.checkpoints}: no checkpoint; no plan shown")
    kind = {"pretrain": "pre-training", "finetune": "fine-tuning"}.get(str(ckpt.kind))
    if kind is None:
        kind = "fine-tuning" if any(r["name"] == "dice" for r in metrics) else "pre-training"
    manifest_sha, manifest_files = None, {}
    if run.manifest.is_file():
        manifest_sha = hashlib.sha256(run.manifest.read_bytes()).hexdigest()
        try:
            manifest_files = {k: len(v) for k, v in run.read_manifest().items()}
        except CheckpointError as err:
            notes.append(str(err))
    environment = None
    if run.environment.is_file():
        try:
            environment = json.loads(run.environment.read_text())
        except ValueError:
            notes.append(f"{run.environment}: not JSON")
    previews = sorted((path / "previews").glob("step_*.png"))
    return Run(path.name, path, kind, metrics, previews, run.config.read_text(),
               ckpt.plan, checkpoint, ckpt.step, environment if isinstance(environment, dict)
               else None, manifest_sha, manifest_files, notes)


# --- the demo and studies ------------------------------------------------------------------------------


def _collection(path: Path, labels: Path | None) -> Report:
    """A folder of runs and prediction folders with a report.md: the demo, or a study."""
    text = (path / "report.md").read_text()
    try:
        data = read_results(path)
    except DataError as err:
        data = None
        note = str(err)
    else:
        note = "" if data else f"{path / RESULTS}: none (a folder written by an older swinssl); the runs and predictions only"
    kind = "demo" if data and data["kind"] == "demo" else "study"
    report = Report(path, kind, text=text)
    if note:
        report.notes.append(note)
    for sub in _subfolders(path):
        if PredictionFolder(sub).exists():
            name = sub.name.removeprefix("predictions_") or sub.name
            _add_predictions(report, sub, name, labels, sub)
        elif _is_run(sub):
            report.runs.append(read_run(sub))
    viewer = (data or {}).get("viewer") or {}
    for layer, folder in (viewer.get("folders") or {}).items():  # a study's chosen case, one layer per arm
        labels_of = labels or _locate(viewer.get("labels"), path)
        _add_predictions(report, path / folder, layer, labels_of, path / folder)
    report.figures = sorted(path.glob("*.png"))
    if kind == "demo" and "verdict" in data:
        _demo_summary(report, data)
    elif data and data.get("kind") == "study benchmark":
        _benchmark_summary(report, data)
    elif data and isinstance(data.get("rows"), list) and all(isinstance(r, dict) for r in data["rows"]):
        rows = data["rows"]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        report.tables.append(Table(RESULTS, columns, [[r.get(c) for c in columns] for r in rows]))
    return report


def _demo_summary(report: Report, results: dict) -> None:
    """The demo's answer first: its verdict, the probe, and the test mean Dice of each initialisation."""
    report.summary.append(f"Pre-trained vs scratch, test cases' mean Dice: {results['verdict']}")
    probe = results.get("probe") or {}
    if probe.get("pretrained") is not None:
        report.summary.append(f"Frozen-encoder probe, mean Dice on held-out cases: pre-trained encoder "
                              f"{probe['pretrained']:.3f}, random encoder {probe.get('random') or 0:.3f}.")
    mean = {init: d.get("mean") for init, d in (results.get("dice") or {}).items() if d.get("mean") is not None}
    if mean:
        report.summary.append("Test mean Dice: " + ", ".join(f"{init} {v:.3f}" for init, v in mean.items()) + ".")


def _benchmark_summary(report: Report, results: dict) -> None:
    """The benchmark study's answer: the arm chosen on dev, the rank tables, every comparison, device-hours."""
    if results.get("chosen_on_dev"):
        report.summary.append(f"Best mean rank on the dev datasets: {results['chosen_on_dev']}.")
    for tag, ranks in (results.get("ranks") or {}).items():
        settings = list(ranks["mean_dice"])
        report.tables.append(Table(
            f"Mean rank on the {tag} datasets (1 = best, ties averaged) and mean Dice per dataset@fraction",
            ["arm", "mean rank", *settings],
            [[arm, rank, *(ranks["mean_dice"][s].get(arm) for s in settings)] for arm, rank in ranks["mean_rank"].items()]))
    columns = ["family", "first", "second", "n", "mean", "low", "high", "effect", "p_value", "p_holm", "sign"]
    comparisons = results.get("comparisons") or []
    if comparisons:
        report.tables.append(Table("Pairwise comparisons, paired per case and seed (p_holm: Holm within each family)",
                                   columns, [[c.get(k) for k in columns] for c in comparisons]))
    hours = {**(results.get("device_hours") or {}),
             **{f"pre-training {k}": v.get("device_hours") for k, v in (results.get("pretraining") or {}).items()}}
    if hours:
        report.tables.append(Table("Training device-hours (pre-training apart)", ["arm", "device-hours"],
                                   [[arm, h] for arm, h in hours.items()]))


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
