"""``swinssl report``: one self-contained HTML page per prediction folder, training run, study or
demo, with a 3D viewer (NiiVue) of image, label and prediction.

``collect`` gathers what a folder holds (plain data, ``report.collect``); ``render`` turns it into
the page (``report.page``); ``write_report`` does both and writes the file.
"""

from __future__ import annotations

from pathlib import Path

from swinssl.errors import ConfigError
from swinssl.report.collect import Report, collect
from swinssl.report.page import MAX_CASES, render
from swinssl.report.volumes import MAX_SIDE
from swinssl.utils import atomic_write_text, writable_dir

__all__ = ["MAX_CASES", "MAX_SIDE", "Report", "collect", "render", "write_report"]


def write_report(path: str | Path, out: str | Path | None = None, labels: str | Path | None = None,
                 evaluation: str | Path | None = None, max_side: int = MAX_SIDE, max_cases: int = MAX_CASES) -> Path:
    """Write the HTML report of ``path`` to ``out`` (default ``path/report.html``) and return it.

    ``path``: a prediction folder, a training run, a cross-validation, a study or the demo folder;
    ``labels``: the dataset a prediction folder's cases are labelled in (default: the one its
    evaluation used); ``evaluation``: the folder with its metrics.csv (default: the prediction folder);
    ``max_side``: volumes longer along an axis are downsampled for display; ``max_cases``: cases the
    viewer holds (the table lists all). ``DataError`` naming ``path`` for a folder of no known kind.
    """
    if max_side < 16:
        raise ConfigError(f"max_side: at least 16 voxels, got {max_side}")
    if max_cases < 1:
        raise ConfigError(f"max_cases: at least 1, got {max_cases}")
    report = collect(path, labels=labels, evaluation=evaluation)
    out = Path(out).expanduser() if out is not None else Path(path).expanduser() / "report.html"
    writable_dir(out.parent)
    atomic_write_text(out, render(report, max_side=max_side, max_cases=max_cases))
    return out
