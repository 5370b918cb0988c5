"""The report as one self-contained HTML page: ``render(report)`` fills ``assets/page.html``
(``string.Template``) with the sections of a ``collect.Report``, the volumes its viewer shows, our
own page script (``assets/viewer.js``) and the pinned NiiVue bundle (``vendor/niivue.umd.js``),
inlined unchanged: the page opens from ``file://`` with no server and no network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from html import escape
from pathlib import Path
from string import Template
from typing import Any, Iterable, Sequence

import numpy as np

import swinssl
from swinssl.errors import DataError, DependencyError
from swinssl.report.charts import line_chart, run_panels
from swinssl.report.collect import Case, Report, Run
from swinssl.report.volumes import MAX_SIDE, Embedded, encode_image, encode_mask, read_grid

ASSETS = Path(__file__).with_name("assets")
NIIVUE = Path(__file__).with_name("vendor") / "niivue.umd.js"
NIIVUE_PACKAGE = "@niivue/niivue"
NIIVUE_VERSION = "0.69.0"
NIIVUE_SHA256 = "47b896b77ec4a5be3ef1949c33ad393b6f45629921f326c279000bcf51bdb4af"
MAX_CASES = 12  # cases the viewer holds; the metrics table lists all
# One colour per class value (1, 2, ...; cycled beyond), none of them the crosshair's blue.
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
           (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180))


def class_colour(value: int) -> tuple[int, int, int]:
    return PALETTE[(value - 1) % len(PALETTE)]


def niivue_bundle() -> str:
    """The pinned NiiVue bundle's text, checked against its sha256 and for text that would end the
    inline script early."""
    try:
        raw = NIIVUE.read_bytes()
    except OSError as err:
        raise DependencyError(f"{NIIVUE}: the NiiVue bundle is missing ({err.strerror}); reinstall swinssl") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != NIIVUE_SHA256:
        raise DependencyError(f"{NIIVUE}: not the pinned {NIIVUE_PACKAGE} {NIIVUE_VERSION} (sha256 {digest}, "
                              f"expected {NIIVUE_SHA256}); reinstall swinssl")
    text = raw.decode("utf-8")
    if re.search(r"</script|<!--", text, re.IGNORECASE):
        raise DependencyError(f"{NIIVUE}: holds '</script' or '<!--' and cannot be inlined into a page")
    return text


def render(report: Report, max_side: int = MAX_SIDE, max_cases: int = MAX_CASES) -> str:
    """The report page's HTML. Reads the volumes of up to ``max_cases`` cases (those with the lowest
    mean Dice when scores are known), downsampled beyond ``max_side`` voxels per axis."""
    viewer_data, volumes, shown = _viewer_data(report, max_side, max_cases)
    sections = [
        ("summary", "Summary", _summary(report)),
        ("viewer", "Viewer", _viewer(report, viewer_data, max_side, max_cases) if viewer_data["cases"] else ""),
        ("scores", "Scores per case and class", _scores(report, shown)),
        ("runs", "Training runs", "".join(_run(run) for run in report.runs)),
        ("figures", "Figures", _figures(report.figures)),
        ("provenance", "Provenance", "".join(_provenance(run) for run in report.runs) + _report_text(report)),
    ]
    sections = [(anchor, title, html) for anchor, title, html in sections if html]
    template = Template((ASSETS / "page.html").read_text())
    return template.substitute(
        version=escape(swinssl.__version__),
        title=escape(report.title),
        meta=escape(f"{report.source} · written {time.strftime('%Y-%m-%d %H:%M')} by swinssl "
                    f"{swinssl.__version__}"),
        nav="".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in sections),
        style=(ASSETS / "report.css").read_text(),
        guard=(ASSETS / "guard.js").read_text(),
        viewer_state="loading" if viewer_data["cases"] else "none",
        body="\n".join(f'<section id="{a}"><h2>{escape(t)}</h2>\n{html}</section>' for a, t, html in sections),
        footer=_footer(),
        data=_script_json(viewer_data),
        volumes="\n".join(f'<script type="application/octet-stream" id="{vid}">{data}</script>'
                          for vid, data in volumes.items()),
        niivue=niivue_bundle() if viewer_data["cases"] else "",  # a page without cases needs no viewer
        viewer=(ASSETS / "viewer.js").read_text(),
    )


# --- viewer --------------------------------------------------------------------------------------------


def chosen_cases(report: Report, max_cases: int) -> list[Case]:
    """The cases the viewer holds: all, or the ``max_cases`` with the lowest mean Dice (cases without
    scores last), in the report's order."""
    if len(report.cases) <= max_cases:
        return list(report.cases)
    dice: dict[str, list[float]] = {}
    for row in report.scores:
        dice.setdefault(row["case_id"], []).append(row["dice"])
    ranked = sorted(report.cases, key=lambda c: np.mean(dice[c.case_id]) if c.case_id in dice else float("inf"))
    keep = {id(c) for c in ranked[:max_cases]}
    return [c for c in report.cases if id(c) in keep]


def _viewer_data(report: Report, max_side: int, max_cases: int) -> tuple[dict, dict[str, str], dict[str, int]]:
    """The viewer's JSON (cases, classes), the volumes by element id, and case id -> its index in the viewer."""
    volumes: dict[str, str] = {}
    values: set[int] = set()
    cases = []
    for case in chosen_cases(report, max_cases):
        entry: dict[str, Any] = {"id": case.case_id, "image": None, "layers": [], "problems": [], "centre": None,
                                 "info": "", "scores": _case_scores(report, case.case_id)}
        if case.image is None:
            entry["problems"].append(case.problem)
        else:
            try:
                embedded = encode_image(*read_grid(case.image, "image"), max_side=max_side)
            except DataError as err:
                entry["problems"].append(f"image: {err}")
            else:
                entry["image"] = _add(volumes, embedded.data)
                entry["info"] = _shape_note(case.image, embedded)
        for layer in case.layers:
            item = {"name": layer.name, "volume": None, "problem": layer.problem}
            if layer.path is not None:
                try:
                    mask, affine = read_grid(layer.path, layer.name)
                except DataError as err:
                    item["problem"] = str(err)
                else:
                    # The label as contours, predictions filled: a screenshot tells them apart.
                    embedded = encode_mask(mask, affine, max_side, outline=layer.name == "label")
                    values.update(embedded.values)
                    item["volume"] = _add(volumes, embedded.data)
                    entry["centre"] = entry["centre"] or embedded.centre  # the label's, else the first prediction's
            entry["layers"].append(item)
        cases.append(entry)
    classes = {**{v: f"class {v}" for v in values}, **report.classes}
    data = {"cases": cases, "classes": [{"value": v, "name": classes[v], "color": class_colour(v)}
                                        for v in sorted(classes)]}
    index: dict[str, int] = {}
    for i, case in enumerate(cases):
        index.setdefault(case["id"], i)
    return data, volumes, index


def _add(volumes: dict[str, str], data: str) -> str:
    vid = f"volume-{len(volumes)}"
    volumes[vid] = data
    return vid


def _shape_note(path: Path, embedded: Embedded) -> str:
    shape = "×".join(map(str, embedded.shape))
    if not embedded.downsampled:
        return f"{path.name}: {shape} voxels, shown at full resolution"
    steps = "/".join(map(str, embedded.step))
    return (f"{path.name}: {shape} voxels, shown downsampled to {'×'.join(map(str, embedded.shown))} "
            f"(every {steps} voxel along x/y/z) for display; scores are on the full volume")


def _case_scores(report: Report, case_id: str) -> list[dict[str, Any]]:
    return [{k: row[k] for k in ("layer", "class_name", "dice", "hd95", "nsd")}
            for row in report.scores if row["case_id"] == case_id]


def _viewer(report: Report, data: dict, max_side: int, max_cases: int) -> str:
    layers = list(dict.fromkeys(layer["name"] for case in data["cases"] for layer in case["layers"]))
    predictions = [name for name in layers if name != "label"]
    rows = []
    for name in layers:
        on = name == "label" or name == (predictions[0] if predictions else None)
        shown = f"{name} (outline)" if name == "label" else name
        rows.append(f'<div class="layer-row"><label><input type="checkbox" data-layer="{escape(name)}"'
                    f'{" checked" if on else ""}> {escape(shown)}</label>'
                    f'<input type="range" min="0" max="1" step="0.05" value="{1 if name == "label" else 0.5}" '
                    f'data-layer-opacity="{escape(name)}" aria-label="opacity of {escape(name)}"></div>')
    legend = "".join(f'<label><input type="checkbox" data-class="{c["value"]}" checked>'
                     f'<span class="swatch" style="background:rgb{tuple(c["color"])}"></span>'
                     f'{escape(str(c["value"]))} {escape(c["name"])}</label>' for c in data["classes"])
    options = "".join(f'<option value="{i}">{escape(c["id"])}</option>' for i, c in enumerate(data["cases"]))
    held = len(data["cases"])
    note = (f"The viewer holds the {held} cases with the lowest mean Dice of {len(report.cases)} (--max-cases "
            f"{max_cases}); the table below lists all. " if held < len(report.cases) else "")
    note += (f"Volumes longer than {max_side} voxels along an axis are downsampled for display (nearest voxel; the "
             "case line says so); images are shown in 256 grey levels. Drag to move the crosshair, right-drag to "
             "change contrast, scroll to change slice; drag the 3D view to rotate it.")
    views = "".join(f'<button type="button" data-view="{v}">{t}</button>' for v, t in
                    (("planes", "3 planes + 3D"), ("axial", "axial"), ("coronal", "coronal"),
                     ("sagittal", "sagittal"), ("render", "3D")))
    return f"""<p class="muted">{escape(note)}</p>
<div class="controls"><label>case <select id="case-select">{options}</select></label>
<span id="view-buttons">{views}</span></div>
<div id="viewer-message" role="alert" hidden></div>
<div class="viewer">
<div><div id="canvas-box"><canvas id="viewer-canvas"></canvas></div><p id="case-info"></p></div>
<div>
<div class="panel"><h3>Layers (visible, opacity)</h3>{"".join(rows)}</div>
<div class="panel"><h3>Classes</h3>{legend}</div>
<div class="panel"><h3>This case</h3><div id="case-scores"></div></div>
</div>
</div>"""


# --- other sections ------------------------------------------------------------------------------------


def _summary(report: Report) -> str:
    parts = []
    if report.summary:
        parts.append('<ul class="summary">' + "".join(f"<li>{escape(s)}</li>" for s in report.summary) + "</ul>")
    for table in report.tables:
        parts.append(f"<h3>{escape(table.title)}</h3>" + _table(table.columns, table.rows))
    if report.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in report.notes) + "</ul>")
    return "\n".join(parts)


def _means(scores: Sequence[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in scores:
        groups.setdefault((row["layer"], row["class_name"]), []).append(row)
    rows = [[layer, name, len(g), *(float(np.mean([r[m] for r in g])) for m in ("dice", "hd95", "nsd"))]
            for (layer, name), g in groups.items()]
    return "<h3>Mean over cases</h3>" + _table(["layer", "class", "cases", "Dice", "HD95 mm", "NSD"], rows)


def _scores(report: Report, index: dict[str, int]) -> str:
    if not report.scores:
        return ""
    body = []
    for row in report.scores:
        case = escape(row["case_id"])
        if row["case_id"] in index:
            case = (f'<a class="case-link" href="#case={escape(row["case_id"])}" data-case="{index[row["case_id"]]}">'
                    f"{case}</a>")
        cells = [f"<td>{case}</td>", f"<td>{escape(row['layer'])}</td>",
                 f'<td data-value="{row["class"]}">{escape(str(row["class"]))} {escape(row["class_name"])}</td>']
        cells += [f'<td class="num" data-value="{row[m]}">{_number(row[m], m)}</td>' for m in ("dice", "hd95", "nsd")]
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("case", "layer", "class", "Dice", "HD95 mm", "NSD"))
    return (_means(report.scores) + f'<h3>Per case</h3><p class="muted">{len(report.scores)} rows; click a column '
            f'to sort it, a case to show it in the viewer.</p><table class="sortable" id="scores-table"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def _run(run: Run) -> str:
    panels = run_panels(run.metrics)
    charts = "".join(line_chart(title, series) for title, series in panels)
    parts = [f"<h3>{escape(run.name)} ({escape(run.kind)})</h3>",
             f'<div class="charts">{charts}</div>' if charts else '<p class="muted">No curves logged.</p>']
    previews = run.previews if len(run.previews) <= 2 else [run.previews[0], run.previews[-1]]
    if previews:
        what = "reconstruction previews" if run.kind == "pre-training" else "validation overlays"
        figures = "".join(f"<figure>{_png(p)}<figcaption>{escape(p.name)}</figcaption></figure>" for p in previews)
        parts.append(f'<p class="muted">{what} (first and last of {len(run.previews)}):</p>'
                     f'<div class="previews">{figures}</div>')
    return "\n".join(parts)


def _figures(figures: Iterable[Path]) -> str:
    return "".join(f"<figure>{_png(p)}<figcaption>{escape(p.name)}</figcaption></figure>" for p in figures)


def _provenance(run: Run) -> str:
    plan = run.plan or {}
    env = run.environment or {}
    packages = env.get("packages") if isinstance(env.get("packages"), dict) else {}
    recorded = plan.get("manifest_sha256")
    manifest = run.manifest_sha256 or "no manifest.json"
    if run.manifest_sha256 and recorded:
        manifest += " (the checkpoint's plan records the same)" if recorded == run.manifest_sha256 else \
            f" (the checkpoint's plan records {recorded}: the manifest changed)"
    rows = [
        ["run", str(run.path.resolve())],
        ["checkpoint", f"{run.checkpoint} (step {run.step})" if run.checkpoint else "none"],
        ["data manifest sha256", manifest],
        ["cases in the manifest", ", ".join(f"{k}: {v}" for k, v in run.manifest_files.items()) or "-"],
        ["pre-trained from", plan.get("pretrained") or "-"],
        ["swinssl", plan.get("package_version") or env.get("swinssl") or "-"],
        ["python", env.get("python") or "-"],
        *[[name, version or "-"] for name, version in packages.items()],
        ["host, devices", f"{env.get('host', '-')}, {env.get('cpus', '-')} CPUs, CUDA: {env.get('cuda', '-')}"],
        ["command", " ".join(map(str, env.get("command") or [])) or "-"],
    ]
    parts = [f"<h3>{escape(run.name)}</h3>", _table(["", ""], rows, head=False)]
    if run.plan:
        parts.append(f"<details><summary>plan (from the checkpoint)</summary><pre>"
                     f"{escape(json.dumps(run.plan, indent=2))}</pre></details>")
    parts.append(f"<details><summary>config.yaml</summary><pre>{escape(run.config)}</pre></details>")
    if run.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in run.notes) + "</ul>")
    return "\n".join(parts)


def _report_text(report: Report) -> str:
    if not report.text:
        return ""
    return f"<details><summary>report.md</summary><pre>{escape(report.text)}</pre></details>"


def _footer() -> str:
    return (f"Written by swinssl {escape(swinssl.__version__)}. The viewer is NiiVue {NIIVUE_VERSION} "
            f"({NIIVUE_PACKAGE}, BSD-2-Clause, Copyright (c) 2021, Niivue; https://github.com/niivue/niivue), "
            "inlined unchanged; its licence and those of the packages it bundles ship with swinssl in "
            "swinssl/report/vendor/. This page needs no network.")


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], head: bool = True) -> str:
    out = ["<table>"]
    if head:
        out.append("<thead><tr>" + "".join(f"<th>{escape(str(c))}</th>" for c in columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in rows:
        out.append("<tr>" + "".join(_cell(v) for v in row) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f'<td class="num">{value:.4g}</td>'
    return f"<td>{escape(str(value))}</td>"


def _number(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "hd95" else f"{value:.3f}"


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{escape(path.name)}" src="data:image/png;base64,{data}">'


def _script_json(data: Any) -> str:
    """JSON safe inside a <script> element: '</' cannot end it early."""
    return json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
