"""Segmentation metrics: Dice, HD95 and NSD per case and class, and ``evaluate`` for folders.

Conventions (also written into ``summary.json`` so a result file explains itself):

- Metrics are computed per case and per foreground class on binary masks
  ``pred == c`` and ``label == c`` with MONAI's ``compute_dice``,
  ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice``.
- HD95 and NSD are measured in physical space (mm) using the label's voxel
  spacing (column norms of the affine's 3x3 part). HD95 is the symmetric 95th
  percentile Hausdorff distance between the two surfaces (MONAI: the larger of
  the two directed 95th percentiles of distances between edge voxels).
- NSD (normalised surface Dice, Nikolov et al. 2021) is the fraction of edge
  voxels of both masks whose distance to the other surface is <= the tolerance
  (mm). The tolerance is one value for all classes or one per class.
- Empty masks are defined so that no NaN or inf ever appears:

  ============================  ======  ==========================  =====
  case                          Dice    HD95 (mm)                   NSD
  ============================  ======  ==========================  =====
  label and prediction empty    1       0                           1
  only one of them empty        0       worst case: the diagonal    0
                                        of the volume (see below)
  ============================  ======  ==========================  =====

  The worst-case HD95 is the diagonal of the volume's field of view,
  ``sqrt(sum((n_i * spacing_i) ** 2))``: larger than any distance between two
  voxels of the volume, so a missed or hallucinated structure always scores
  worse than any real contour error. It depends on the volume size, so compare
  HD95 means only between evaluations of the same images.
- Summaries give per-class mean and population standard deviation (ddof=0)
  over cases, the number of cases, and the unweighted mean over classes of the
  per-class means. Class keys in summaries are strings (``"1"``), as in JSON.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from swinssl.data.discover import VOLUME_SUFFIXES, find_dataset, is_volume_file, volume_stem
from swinssl.data.io import check_grids, check_same_grid, read_volume, spacing_of
from swinssl.errors import ConfigError, DataError
from swinssl.results import EvaluationFolder
from swinssl.utils import writable_dir

log = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "nsd")
CONVENTIONS = {
    "both_empty": "dice 1, hd95 0 mm, nsd 1",
    "one_empty": "dice 0, nsd 0, hd95 = diagonal of the volume's field of view in mm (worst case)",
    "hd95": "symmetric 95th percentile Hausdorff distance between edge voxels, in mm (label spacing)",
    "nsd": "fraction of edge voxels of both masks within the class tolerance (mm) of the other surface",
    "std": "population standard deviation over cases (ddof=0)",
    "mean": "unweighted mean over classes of the per-class means",
}
_LIST_LIMIT = 20  # case ids listed in one log line before "and N more"

Array = np.ndarray | torch.Tensor
Tolerance = float | Mapping[int, float]


# --- one case -----------------------------------------------------------------------------------


def case_metrics(
    pred: Array,
    label: Array,
    spacing: Sequence[float],
    classes: Iterable[int],
    nsd_tolerance: Tolerance = 1.0,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 (mm) and NSD of each class in ``classes`` for one case.

    ``pred`` and ``label`` are integer label maps of equal shape ``(X, Y, Z)``
    (numpy or torch); ``spacing`` is the voxel size in mm along X, Y, Z;
    ``nsd_tolerance`` is in mm, one value or a ``{class: mm}`` dict.
    Returns ``{class: {"dice", "hd95", "nsd"}}``, always finite (empty masks:
    see the module docstring).
    """
    pred_t, label_t = torch.as_tensor(pred), torch.as_tensor(label)
    if pred_t.ndim != 3 or pred_t.shape != label_t.shape:
        raise ValueError(f"pred and label must be 3D of equal shape, got {tuple(pred_t.shape)} and {tuple(label_t.shape)}")
    spacing_mm = _check_spacing(spacing)
    classes = [int(c) for c in classes]
    tolerances = nsd_tolerances(nsd_tolerance, classes)
    worst = worst_distance(tuple(label_t.shape), spacing_mm)
    return {c: _class_metrics(pred_t == c, label_t == c, spacing_mm, tolerances[c], worst) for c in classes}


def worst_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the field of view in mm: the HD95 given when only one of the masks is empty."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def nsd_tolerances(nsd_tolerance: Tolerance, classes: Sequence[int]) -> dict[int, float]:
    """One tolerance (mm) per class from a single value or a ``{class: mm}`` dict."""
    if isinstance(nsd_tolerance, Mapping):
        given = {int(k): float(v) for k, v in nsd_tolerance.items()}
        missing = [c for c in classes if c not in given]
        if missing:
            raise ConfigError(f"nsd_tolerance: no tolerance for class(es) {missing} (given for {sorted(given)})")
        tolerances = {c: given[c] for c in classes}
    else:
        tolerances = {c: float(nsd_tolerance) for c in classes}
    bad = {c: t for c, t in tolerances.items() if not (math.isfinite(t) and t >= 0)}
    if bad:
        raise ConfigError(f"nsd_tolerance: must be finite and >= 0 mm, got {bad}")
    return tolerances


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be 3 positive finite numbers (mm), got {tuple(spacing)}")
    return values  # type: ignore[return-value]


def _class_metrics(
    pred: torch.Tensor, label: torch.Tensor, spacing: tuple[float, float, float], tolerance: float, worst: float
) -> dict[str, float]:
    """Metrics of one binary mask pair; empty masks are decided here, before MONAI (which gives NaN/inf)."""
    has_pred, has_label = bool(pred.any()), bool(label.any())
    if not has_pred and not has_label:
        return {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}
    if has_pred != has_label:
        return {"dice": 0.0, "hd95": worst, "nsd": 0.0}
    # One channel holding this class is the one-hot encoding restricted to it, so
    # include_background=True keeps it; a volume-sized background channel would only cost memory.
    y_pred, y = pred[None, None].float(), label[None, None].float()
    with warnings.catch_warnings():
        # MONAI passes a deprecated argument to itself (get_mask_edges); nothing the user can act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        dice = compute_dice(y_pred, y, include_background=True)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
        nsd = compute_surface_dice(y_pred, y, [tolerance], include_background=True, spacing=list(spacing))
    return {"dice": float(dice.item()), "hd95": float(hd95.item()), "nsd": float(nsd.item())}


# --- summaries ----------------------------------------------------------------------------------


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-class mean/std/n of each metric over cases, and the mean over classes.

    ``rows`` are records with ``case_id``, ``class``, ``dice``, ``hd95``, ``nsd``
    and optionally ``class_name`` (the rows of ``metrics.csv``). Returns
    ``{"n_cases", "classes": {"<c>": {"name", "n", "dice": {"mean", "std"}, ...}},
    "mean": {"dice", "hd95", "nsd"}}``; ``mean`` is empty when there are no rows.
    """
    by_class: dict[int, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_class.setdefault(int(row["class"]), []).append(row)
    classes: dict[str, dict[str, Any]] = {}
    for c in sorted(by_class):
        group = by_class[c]
        entry: dict[str, Any] = {"name": str(group[0].get("class_name", "") or _default_name(c)), "n": len(group)}
        for metric in METRICS:
            values = np.asarray([float(r[metric]) for r in group], dtype=np.float64)
            entry[metric] = {"mean": float(values.mean()), "std": float(values.std(ddof=0))}
        classes[str(c)] = entry
    mean = {m: float(np.mean([e[m]["mean"] for e in classes.values()])) for m in METRICS} if classes else {}
    return {"n_cases": len({r["case_id"] for r in rows}), "classes": classes, "mean": mean}


def format_summary(summary: Mapping[str, Any]) -> str:
    """A plain-text table of a summary: class, n, Dice, HD95 (mm) and NSD as mean ± std."""
    header = ("class", "n", "Dice", "HD95 (mm)", "NSD")
    lines = [header]
    for key, entry in summary["classes"].items():
        name = f"{key} {entry['name']}".strip()
        d, h, s = (entry[m] for m in METRICS)
        lines.append(
            (
                name,
                str(entry["n"]),
                f"{d['mean']:.4f} ± {d['std']:.4f}",
                f"{h['mean']:.2f} ± {h['std']:.2f}",
                f"{s['mean']:.4f} ± {s['std']:.4f}",
            )
        )
    if summary.get("mean"):
        m = summary["mean"]
        lines.append(("mean", str(summary.get("n_cases", "")), f"{m['dice']:.4f}", f"{m['hd95']:.2f}", f"{m['nsd']:.4f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def _default_name(c: int) -> str:
    return f"class_{c}"


# --- folders ------------------------------------------------------------------------------------


def evaluate(
    pred_dir: str | Path,
    labels: str | Path,
    out_dir: str | Path | None = None,
    classes: Sequence[int] | None = None,
    nsd_tolerance: Tolerance = 1.0,
    class_names: Mapping[int, str] | None = None,
    split: str | None = None,
) -> dict[str, Any]:
    """Compare the predicted masks in ``pred_dir`` with their labels; return the summary.

    ``pred_dir`` holds ``<case_id>.<ext>`` label maps (NIfTI, NRRD, MHA).
    ``labels`` is a folder of ``<case_id>.<ext>`` label files, or a dataset that
    ``find_dataset`` reads (MSD ``dataset.json``, nnU-Net raw folder, a folder of
    image/label pairs): its labelled cases are used, and its class names.
    Cases pair by id; predictions without a label are skipped with a warning,
    labels without a prediction are listed in one warning. Each prediction must
    have its label's shape and affine. ``classes`` defaults to every nonzero
    value found in the labels. ``split`` (training, validation, test) restricts a dataset's
    cases to that split. With ``out_dir``, writes ``metrics.csv`` (one row
    per case and class) and ``summary.json``.
    """
    pred_dir, labels = Path(pred_dir).expanduser(), Path(labels).expanduser()
    wanted = [int(c) for c in classes] if classes is not None else None
    if wanted is not None:
        if not wanted:
            raise ConfigError("classes: empty list (leave it out to use every class found in the labels)")
        nsd_tolerances(nsd_tolerance, wanted)  # a missing per-class tolerance fails before any file is read
    if out_dir is not None:
        out_dir = writable_dir(out_dir)
    predictions = _predictions(pred_dir)
    labelled, dataset_names = label_files(labels, split)
    pairs = _pair(predictions, labelled, pred_dir, labels)
    names = {**dataset_names, **(dict(class_names) if class_names else {})}

    # From the headers, before any case is scored: a mismatch in the last case stops nothing half done.
    check_grids([pair for _, pair in sorted(pairs.items())], what="", ref_what="label", rtol=0.0)
    per_case, found, predicted = _score_pairs(pairs, wanted, nsd_tolerance)
    if wanted is None:
        if not found:
            raise DataError(f"{labels}: the labels hold no foreground (nonzero) values; pass classes to evaluate anyway")
        extra = sorted(predicted - found)
        if extra:
            log.warning("predictions hold classes %s that no label has; not evaluated (pass classes to include them)", extra)
        wanted = sorted(found)
    rows = _rows(per_case, wanted, names)
    summary = summarize(rows)
    tolerance_mm = nsd_tolerances(nsd_tolerance, wanted)
    for c in wanted:
        summary["classes"][str(c)]["nsd_tolerance_mm"] = tolerance_mm[c]
    summary.update(
        {
            "pred_dir": str(pred_dir),
            "labels": str(labels),
            "missing_predictions": sorted(set(labelled) - set(pairs)),
            "unlabelled_predictions": sorted(str(p) for cid, p in predictions.items() if cid not in pairs),
            "conventions": dict(CONVENTIONS),
        }
    )
    if out_dir is not None:
        EvaluationFolder(out_dir).write(rows, summary)
    return summary


def _score_pairs(
    pairs: Mapping[str, tuple[Path, Path]], classes: list[int] | None, nsd_tolerance: Tolerance
) -> tuple[dict[str, dict[int, dict[str, float]]], set[int], set[int]]:
    """Metrics per case, and the nonzero values seen in the labels and in the predictions.

    Files are read one pair at a time so memory stays at one case. Without ``classes``
    the union over all labels is known only at the end, so each case scores what its
    two masks hold; a class absent from both is "both empty" and ``_rows`` fills it in.
    """
    per_case: dict[str, dict[int, dict[str, float]]] = {}
    found: set[int] = set()
    predicted: set[int] = set()
    for case_id, (pred_path, label_path) in pairs.items():
        label, affine = _read_mask(label_path, "label")
        pred, pred_affine = _read_mask(pred_path, "prediction")
        check_same_grid(pred_path, pred.shape, pred_affine, label_path, label.shape, affine, ref_what="label")
        label_values, pred_values = _nonzero_values(label), _nonzero_values(pred)
        found |= label_values
        predicted |= pred_values
        if classes is not None:
            here, tolerance = classes, nsd_tolerance
        else:
            here = sorted(label_values | pred_values)
            tolerance = _case_tolerances(nsd_tolerance, here, label_values)
        per_case[case_id] = case_metrics(pred, label, spacing_of(affine), here, tolerance)
        log.info("%s: evaluated", case_id)
    return per_case, found, predicted


def _case_tolerances(nsd_tolerance: Tolerance, here: Sequence[int], labelled: set[int]) -> Tolerance:
    """Tolerances for the classes computed in one case when the classes are not given up front.

    Every class present in the label must have a tolerance (raises naming those without);
    a class only predicted never reaches the surface metrics (one mask is empty), so 0 stands in.
    """
    if not isinstance(nsd_tolerance, Mapping):
        return nsd_tolerance
    nsd_tolerances(nsd_tolerance, sorted(labelled))
    given = {int(k): float(v) for k, v in nsd_tolerance.items()}
    return {c: given.get(c, 0.0) for c in here}


def _predictions(pred_dir: Path) -> dict[str, Path]:
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: not a folder of predicted masks")
    predictions = _volumes_by_id(pred_dir)
    if not predictions:
        raise DataError(f"{pred_dir}: no predicted masks found (looked for {', '.join(VOLUME_SUFFIXES)} files)")
    return predictions


def label_files(labels: Path, split: str | None = None) -> tuple[dict[str, Path], dict[int, str]]:
    """Label file per case id (of one split of a dataset, if given), and class names where declared."""
    if not labels.exists():
        raise DataError(f"{labels}: no such file or folder")
    if labels.is_file() and labels.suffix != ".json":
        raise DataError(f"{labels}: expected a folder of label files or a dataset.json, got a single file")
    is_dataset = labels.is_file() or (labels / "dataset.json").is_file()
    if not is_dataset:
        files = _volumes_by_id(labels)
        # A folder of bare <case_id> files is a label folder; one of image/label pairs (in it or in its
        # subfolders, as data check reads it) is a dataset.
        try:
            dataset = find_dataset(labels)
        except DataError:
            dataset = None
        if dataset is None or not dataset.labelled:
            if not files:
                raise DataError(f"{labels}: no label files found (looked for {', '.join(VOLUME_SUFFIXES)} files in "
                                "it, and for image/label pairs in it and its subfolders)")
            if split:
                raise ConfigError(f"{labels}: a folder of label files has no splits; split={split!r} needs a dataset")
            return files, {}
    else:
        dataset = find_dataset(labels)
    cases = [c for c in dataset.labelled if split is None or c.split == split]
    if not cases:
        raise DataError(f"{labels}: the dataset has no labelled cases" + (f" in its {split} split" if split else ""))
    by_id: dict[str, Path] = {}
    for case in cases:
        if case.case_id in by_id and by_id[case.case_id] != case.label:
            raise DataError(f"{labels}: case id {case.case_id} has two labels ({by_id[case.case_id]} and {case.label})")
        by_id[case.case_id] = case.label  # type: ignore[assignment]  # labelled: never None
    return by_id, {c: n for c, n in dataset.labels.items() if c != 0}


def _volumes_by_id(folder: Path) -> dict[str, Path]:
    """Volume files directly in ``folder`` keyed by their name without extension."""
    by_id: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and is_volume_file(p)):
        case_id = volume_stem(path)
        if case_id in by_id:
            raise DataError(f"{path}: same case id '{case_id}' as {by_id[case_id].name}; keep one of them")
        by_id[case_id] = path
    return by_id


def _pair(predictions: dict[str, Path], labels: dict[str, Path], pred_dir: Path, labels_path: Path) -> dict[str, tuple[Path, Path]]:
    pairs = {cid: (predictions[cid], labels[cid]) for cid in sorted(predictions) if cid in labels}
    if not pairs:
        raise DataError(
            f"{pred_dir}: no prediction matches a label in {labels_path} "
            f"(predictions: {_short_list(sorted(predictions))}; labels: {_short_list(sorted(labels))})"
        )
    for cid in sorted(predictions):
        if cid not in labels:
            log.warning("%s: no label for case '%s' in %s; skipped", predictions[cid], cid, labels_path)
    missing = sorted(set(labels) - set(predictions))
    if missing:
        log.warning("%d labelled case(s) have no prediction in %s: %s", len(missing), pred_dir, _short_list(missing))
    return pairs


def _short_list(items: Sequence[str]) -> str:
    if not items:
        return "none"
    more = f" and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def _read_mask(path: Path, what: str) -> tuple[torch.Tensor, np.ndarray]:
    """A 3D integer label map ``(X, Y, Z)`` and its affine; DataError naming the file otherwise."""
    volume: MetaTensor = read_volume(path)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise DataError(f"{path}: expected a 3D {what} mask, got an array of shape {tuple(volume.shape)} (channel first)")
    data = volume.as_tensor()[0]
    if not torch.isfinite(data).all():
        raise DataError(f"{path}: {what} has non-finite values (NaN or Inf)")
    rounded = data.round()
    if not torch.equal(data, rounded):
        example = data[data != rounded][0].item()
        raise DataError(f"{path}: {what} has non-integer values (e.g. {example:g}); expected a map of class indices")
    # Integer type: `mask == c` is then an exact comparison, whatever the file stored.
    return rounded.to(torch.int32), np.asarray(volume.affine, dtype=np.float64)


def _nonzero_values(mask: torch.Tensor) -> set[int]:
    return {int(v) for v in torch.unique(mask).tolist() if v != 0}


def _rows(
    per_case: Mapping[str, Mapping[int, Mapping[str, float]]], classes: Sequence[int], names: Mapping[int, str]
) -> list[dict[str, Any]]:
    both_empty = {"dice": 1.0, "hd95": 0.0, "nsd": 1.0}  # a class computed for no mask of this case
    rows = []
    for case_id, metrics in per_case.items():
        for c in classes:
            values = metrics.get(c, both_empty)
            rows.append({"case_id": case_id, "class": c, "class_name": names.get(c, _default_name(c)), **values})
    return rows
