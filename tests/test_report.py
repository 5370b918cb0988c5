"""The HTML report (``swinssl report``): what it gathers from each kind of folder, the page it writes
(self-contained, volumes embedded and downsampled where large, the pinned NiiVue inlined), and that
page in headless Chromium from ``file://`` with the network blocked."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.data.discover import find_dataset
from swinssl.data.phantom import write_phantom_dataset
from swinssl.errors import DataError
from swinssl.metrics import evaluate
from swinssl.report import collect, render, write_report
from swinssl.report.page import NIIVUE, NIIVUE_SHA256, NIIVUE_VERSION, class_colour
from swinssl.report.volumes import encode_image, encode_mask

REPO = Path(__file__).resolve().parents[1]
NAMES = {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "lesion"}
runner = CliRunner()


# --- fixtures: a labelled dataset and prediction folders as swinssl predict / evaluate write them ------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report_data")
    write_phantom_dataset(out, cases=3, size=32, seed=0, test_fraction=0.34)
    return out / "dataset.json"


def predict_like(folder: Path, dataset: Path, cases: int = 2, images: Path | None = None) -> Path:
    """A prediction folder: each mask its case's label shifted by a voxel with the lesion dropped, and
    predictions.json naming input -> mask (inputs copied to ``images`` when given)."""
    folder.mkdir(parents=True)
    record = {}
    for case in find_dataset(dataset).labelled[:cases]:
        label = nib.load(case.label)
        mask = np.roll(np.asarray(label.dataobj).astype(np.uint8), 1, axis=0)
        mask[mask == 4] = 0
        target = folder / f"{case.case_id}.nii.gz"
        nib.save(nib.Nifti1Image(mask, label.affine), target)
        source = case.images[0]
        if images is not None:
            images.mkdir(exist_ok=True)
            source = Path(shutil.copy(source, images / source.name))
        record[str(source)] = str(target)
    (folder / "predictions.json").write_text(json.dumps({"model": "run", "labels": NAMES, "predictions": record,
                                                         "failed": {}}))
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, dataset) -> Path:
    """A prediction folder of two cases with its evaluation (metrics.csv, summary.json) inside."""
    folder = predict_like(tmp_path_factory.mktemp("evaluated") / "predictions", dataset)
    evaluate(folder, dataset, out_dir=folder)
    return folder


def write_run(path: Path, kind: str = "pretrain") -> Path:
    """A training run folder as the engine writes it, with a checkpoint holding only kind, step and plan."""
    import matplotlib.image

    path.mkdir(parents=True)
    (path / "config.yaml").write_text("model:\n  feature_size: 12\ntrain:\n  steps: 4\n")
    manifest = json.dumps({"train": [{"case_id": "a"}, {"case_id": "b"}], "validation": [{"case_id": "c"}]})
    (path / "manifest.json").write_text(manifest)
    (path / "environment.json").write_text(json.dumps({"swinssl": "0.1.0", "python": "3.11.7",
                                                       "packages": {"torch": "9.9.9-test"}, "command": ["swinssl"]}))
    rows = ["step,split,name,value"]
    for step in (1, 2, 3, 4):
        rows += [f"{step},train,loss,{2.0 / step}", f"{step},train,lr,0.001", f"{step},train,crops_per_s,5"]
    if kind == "pretrain":
        rows += ["2,val,loss,1.5", "4,val,loss,1.2", "2,val,probe_dice,0.3", "2,val,probe_dice_random,0.2",
                 "4,val,probe_dice,0.4", "4,val,probe_dice_random,0.2"]
    else:
        rows += ["2,val,dice,0.5", "4,val,dice,0.6", "4,val,dice_liver,0.7"]
    (path / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / "previews").mkdir()
    for step in (2, 4):
        matplotlib.image.imsave(path / "previews" / f"step_{step:07d}.png", np.random.default_rng(step).random((8, 8)))
    (path / "checkpoints").mkdir()
    plan = {"network": {"feature_size": 12}, "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest(),
            "package_version": "0.1.0"}
    name = "last.pt" if kind == "pretrain" else "best.pt"
    torch.save({"kind": kind, "step": 4, "plan": plan, "model": {"w": torch.zeros(2)}}, path / "checkpoints" / name)
    return path


# --- what each kind of folder gives ---------------------------------------------------------------------


def test_prediction_folder_gives_cases_with_label_and_prediction_layers_scores_and_class_names(evaluated, dataset):
    report = collect(evaluated)
    assert report.kind == "prediction folder"
    assert [c.case_id for c in report.cases] == ["phantom_000_ct", "phantom_001_ct"]
    for case in report.cases:
        assert case.image is not None and case.image.is_file()
        assert [(layer.name, layer.path is not None) for layer in case.layers] == [("label", True), ("prediction", True)]
    assert report.classes == {int(k): v for k, v in NAMES.items() if k != "0"}  # dataset.json's names
    assert len(report.scores) == 2 * len(json.loads((evaluated / "summary.json").read_text())["classes"])
    assert {row["layer"] for row in report.scores} == {"prediction"}
    assert not report.notes


def test_labels_come_from_labels_else_the_evaluation_else_a_note(tmp_path, dataset):
    bare = predict_like(tmp_path / "bare", dataset, cases=1)
    report = collect(bare)
    assert [layer.name for layer in report.cases[0].layers] == ["prediction"] and not report.scores
    assert "pass --labels DATASET" in report.notes[0]
    given = collect(bare, labels=dataset)  # no evaluation: scores computed, and said
    assert [layer.name for layer in given.cases[0].layers] == ["label", "prediction"]
    assert given.scores and "scores computed for this report" in given.notes[0]


def test_a_bare_folder_of_masks_with_labels_is_a_prediction_folder(tmp_path, dataset):
    folder = predict_like(tmp_path / "masks", dataset, cases=1)
    (folder / "predictions.json").unlink()  # another tool's output: masks named by case id, nothing else
    with pytest.raises(DataError, match="a folder of masks needs --labels"):
        collect(folder)
    case = collect(folder, labels=dataset).cases[0]
    assert case.image == find_dataset(dataset).labelled[0].images[0]
    assert [layer.name for layer in case.layers] == ["label", "prediction"]


def test_recorded_relative_paths_and_moved_inputs_are_found(tmp_path, dataset, monkeypatch):
    """predict run from another folder records masks relative to it; inputs moved away are found in the
    labels' dataset by case id."""
    folder = predict_like(tmp_path / "runs" / "demo" / "predictions", dataset, cases=1, images=tmp_path / "inputs")
    record = json.loads((folder / "predictions.json").read_text())
    record["predictions"] = {k: str(Path(v).relative_to(tmp_path)) for k, v in record["predictions"].items()}
    (folder / "predictions.json").write_text(json.dumps(record))
    shutil.rmtree(tmp_path / "inputs")
    monkeypatch.chdir(REPO)
    report = collect(folder, labels=dataset)
    case = report.cases[0]
    assert case.image == find_dataset(dataset).labelled[0].images[0]
    assert case.layers[1].path == folder / "phantom_000_ct.nii.gz"
    assert not case.problem


def test_missing_input_image_is_a_case_problem_not_a_failure(tmp_path, dataset):
    folder = predict_like(tmp_path / "predictions", dataset, cases=1, images=tmp_path / "inputs")
    shutil.rmtree(tmp_path / "inputs")
    case = collect(folder).cases[0]
    assert case.image is None and case.problem.startswith("image not found: ") and "inputs" in case.problem


@pytest.mark.parametrize("kind, title", [("pretrain", "pre-training"), ("finetune", "fine-tuning")])
def test_run_report_shows_curves_previews_and_provenance(tmp_path, kind, title):
    run = write_run(tmp_path / "run", kind)
    report = collect(run)
    assert report.kind == f"{title} run" and report.runs[0].step == 4
    page = render(report)
    panels = ["training losses", "learning rate"]
    panels += ["validation losses", "frozen-encoder probe"] if kind == "pretrain" else ["validation Dice"]
    for panel in panels:
        assert f'aria-label="{panel}' in page, panel
    assert "crops_per_s" not in page  # bookkeeping is no curve
    assert page.count("data:image/png;base64,") == 2  # first and last preview
    assert ("reconstruction previews" if kind == "pretrain" else "validation overlays") in page
    digest = hashlib.sha256((run / "manifest.json").read_bytes()).hexdigest()
    assert f"{digest} (the checkpoint&#x27;s plan records the same)" in page
    assert "9.9.9-test" in page and "train: 2, validation: 1" in page and "feature_size: 12" in page
    assert "niivue" not in page.lower().split("<footer>")[0]  # no cases: no viewer, no 2 MB bundle


def test_demo_and_study_folders(tmp_path, dataset, evaluated):
    demo = tmp_path / "demo"
    demo.mkdir()
    for init in ("pretrained", "scratch"):
        shutil.copytree(evaluated, demo / f"predictions_{init}")
    write_run(demo / "pretrain")
    (demo / "report.md").write_text("# swinssl demo\n")
    (demo / "results.json").write_text(json.dumps({"kind": "demo", "verdict": "no detectable difference: +0.01 Dice",
                                                   "probe": {"random": 0.2, "pretrained": 0.4},
                                                   "dice": {"scratch": {"mean": 0.5}, "pretrained": {"mean": 0.6}}}))
    report = collect(demo)
    assert report.kind == "demo" and [r.name for r in report.runs] == ["pretrain"]
    assert [layer.name for layer in report.cases[0].layers] == ["label", "pretrained", "scratch"]
    assert len(report.cases) == 2  # one case per image, each prediction a layer
    assert "no detectable difference: +0.01 Dice" in report.summary[0] and "0.400" in report.summary[1]
    assert {row["layer"] for row in report.scores} == {"pretrained", "scratch"}
    (demo / "results.json").unlink()  # as older demos left it: shown as a folder of runs, said so
    older = collect(demo)
    assert older.kind == "study" and not older.summary and "results.json: none" in older.notes[0]
    (demo / "results.json").write_text(json.dumps({"verdict": "x"}))  # no kind: said, not guessed
    assert not collect(demo).summary and "no 'kind'" in collect(demo).notes[0]

    study = tmp_path / "study"
    study.mkdir()
    (study / "report.md").write_text("# views study\n")
    (study / "results.json").write_text(json.dumps({"kind": "study views",
                                                    "rows": [{"model": "swinmm", "view": "fused", "dice": 0.5}]}))
    report = collect(study)
    assert report.kind == "study" and report.tables[0].columns == ["model", "view", "dice"]
    assert "# views study" in render(report)


def test_cross_validation_folder_shows_its_folds_and_failed_inputs_are_noted(tmp_path, dataset):
    folds = tmp_path / "cv"
    for k in (0, 1):
        write_run(folds / f"fold_{k}", "finetune")
    (folds / "config.yaml").write_text("train: {}\n")
    (folds / "folds.json").write_text(json.dumps({"folds": 2, "runs": ["fold_0", "fold_1"]}))
    report = collect(folds)
    assert report.kind == "cross-validation" and [r.name for r in report.runs] == ["fold_0", "fold_1"]

    folder = predict_like(tmp_path / "predictions", dataset, cases=1)
    record = json.loads((folder / "predictions.json").read_text())
    record["failed"] = {"/data/x.nii.gz": "/data/x.nii.gz: empty file (0 bytes)"}
    (folder / "predictions.json").write_text(json.dumps(record))
    notes = collect(folder).notes
    assert any("1 input(s) had no mask written (e.g. /data/x.nii.gz: empty file" in note for note in notes), notes


def test_a_folder_of_no_known_kind_is_one_clear_line(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=r"stuff: not a folder swinssl report knows; expected predictions.json"):
        collect(tmp_path / "stuff")
    result = runner.invoke(app, ["report", str(tmp_path / "stuff")])
    assert result.exit_code == 3
    assert result.output.count("\n") == 1 and result.output.startswith(f"error: {tmp_path / 'stuff'}: not a folder")
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 3 and "nope: no such folder" in missing.output


# --- volumes and the page --------------------------------------------------------------------------------


def decode(data: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(data)))


def test_large_volumes_are_downsampled_for_display_with_their_affine_scaled():
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    affine[:3, 3] = [-10, 5, 30]
    image = np.random.default_rng(0).normal(100, 20, (300, 40, 20)).astype(np.float32)
    embedded = encode_image(image, affine, max_side=100)
    assert embedded.step == (3, 1, 1) and embedded.shown == (100, 40, 20) and embedded.downsampled
    shown = decode(embedded.data)
    assert shown.shape == (100, 40, 20) and shown.get_data_dtype() == np.uint8
    np.testing.assert_allclose(shown.affine, affine @ np.diag([3, 1, 1, 1]))
    lo, hi = np.percentile(image[::3], [0.5, 99.5])
    middle = np.clip(image[::3], lo, hi)
    assert np.abs(shown.get_fdata() - middle).max() <= (hi - lo) / 255 + 1e-3  # 256 grey levels, real units

    mask = np.zeros((300, 40, 20), np.int16)
    mask[30:90, 10:20, 5:10] = 3
    mask[150:, :, :] = 300  # beyond uint8
    embedded = encode_mask(mask, affine, max_side=100)
    shown = decode(embedded.data)
    assert shown.get_data_dtype() == np.uint16 and shown.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(np.asarray(shown.dataobj), mask[::3])


def test_ct_opens_in_the_soft_tissue_window():
    image = np.full((20, 20, 20), -1000.0, np.float32)
    image[5:15, 5:15, 5:15] = np.linspace(-200, 400, 1000).reshape(10, 10, 10)
    header = decode(encode_image(image, np.eye(4)).data).header
    assert (float(header["cal_min"]), float(header["cal_max"])) == (-175.0, 250.0)


def test_page_is_self_contained_and_says_what_it_downsampled(evaluated, tmp_path):
    page = write_report(evaluated, tmp_path / "r.html", max_side=16)
    text = page.read_text()
    assert page.stat().st_size < 5e6
    assert text.count(NIIVUE.read_text()) == 1  # the pinned bundle, inlined unchanged
    for remote in ('src="http', "src='http", "<link", "import(", "@import"):
        assert remote not in text.replace(NIIVUE.read_text(), ""), remote
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text,
                                re.S).group(1))
    assert [c["id"] for c in data["cases"]] == ["phantom_000_ct", "phantom_001_ct"]
    assert "32×32×32 voxels, shown downsampled to 16×16×16 (every 2/2/2 voxel" in data["cases"][0]["info"]
    assert {c["name"] for c in data["classes"]} >= {"liver", "kidney"}
    assert all(c["color"] == list(class_colour(c["value"])) for c in data["classes"])
    for case in data["cases"]:
        ids = [case["image"], *(layer["volume"] for layer in case["layers"])]
        assert all(f'<script type="application/octet-stream" id="{i}">' in text for i in ids)
        assert case["scores"] and case["centre"]
    assert "BSD-2-Clause" in text and NIIVUE_VERSION in text


def test_viewer_holds_the_worst_cases_when_there_are_many(evaluated):
    report = collect(evaluated)
    for row in report.scores:
        row["dice"] = 0.1 if row["case_id"] == "phantom_001_ct" else 0.9
    from swinssl.report.page import chosen_cases

    assert [c.case_id for c in chosen_cases(report, 1)] == ["phantom_001_ct"]
    assert "holds the 1 cases with the lowest mean Dice of 2" in render(report, max_cases=1)


# --- the vendored NiiVue ---------------------------------------------------------------------------------


def test_shipped_niivue_is_the_pinned_file_with_its_licence():
    assert hashlib.sha256(NIIVUE.read_bytes()).hexdigest() == NIIVUE_SHA256
    readme = (NIIVUE.parent / "README.md").read_text()
    assert f"**`@niivue/niivue` {NIIVUE_VERSION}**" in readme and NIIVUE_SHA256 in readme
    licence = (NIIVUE.parent / "LICENSE").read_text()
    assert licence.startswith("BSD 2-Clause License") and "Copyright (c) 2021, Niivue" in licence
    assert "fflate" in (NIIVUE.parent / "THIRD_PARTY_LICENSES.txt").read_text()


def test_wheel_carries_the_bundle_and_page_assets(tmp_path):
    """What pip install and a wheel carry: package data as pyproject.toml declares it."""
    source = tmp_path / "src_tree"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not installed in this environment")
    assert build.returncode == 0, build.stderr
    import zipfile

    names = set(zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))).namelist())
    report_dir = REPO / "src" / "swinssl" / "report"
    for path in [*report_dir.glob("vendor/*"), *report_dir.glob("assets/*")]:
        assert f"swinssl/report/{path.parent.name}/{path.name}" in names, path
    assert tomllib.loads((REPO / "pyproject.toml").read_text())  # still valid TOML


# --- the command line ----------------------------------------------------------------------------------


def test_report_command_writes_the_page_and_evaluate_html_writes_one_beside_metrics(evaluated, dataset, tmp_path):
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["report", str(evaluated), "--out", str(out), "--max-side", "16"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and f"wrote {out}" in result.output

    folder = predict_like(tmp_path / "predictions", dataset, cases=1)
    result = runner.invoke(app, ["evaluate", str(folder), str(dataset), "--out", str(tmp_path / "eval"), "--html"])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "eval" / "report.html").read_text()
    assert (tmp_path / "eval" / "metrics.csv").is_file() and 'class="case-link"' in page


def test_report_help_and_defaults_match_the_library():
    import typer.main

    from swinssl.report import MAX_CASES, MAX_SIDE

    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert all(flag in result.output for flag in ("--out", "--labels", "--max-cases", "--max-side"))
    params = {p.name: p for p in typer.main.get_command(app).commands["report"].params}  # type: ignore[attr-defined]
    assert (params["max_cases"].default, params["max_side"].default) == (MAX_CASES, MAX_SIDE)


# --- in a browser -----------------------------------------------------------------------------------------


def find_chromium() -> str:
    """Debian's chromium, installed where missing when this process may (root or passwordless sudo)."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    if not shutil.which("apt-get"):
        pytest.skip("no chromium and no apt-get to install it")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and (not shutil.which("sudo") or subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode):
        pytest.skip("no chromium, and installing it needs root (apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run([*sudo, *command], capture_output=True, text=True, env=env, timeout=900)
        if shutil.which("chromium"):
            return shutil.which("chromium")  # type: ignore[return-value]
    pytest.skip(f"chromium could not be installed: {done.stderr.strip()[-300:]}")


WINDOW = "1280,1600"
FLAGS = ["--headless=new", "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost", "--proxy-server=127.0.0.1:9",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
         "--disable-component-update", "--hide-scrollbars", "--force-device-scale-factor=1",
         f"--window-size={WINDOW}", "--virtual-time-budget=20000", "--enable-logging=stderr", "--v=0"]


class Dom(HTMLParser):
    """The body's attributes, and the attributes and text of the elements with an id, of a dumped DOM
    (script contents are not parsed as markup)."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.body: dict = {}
        self.ids: dict[str, dict] = {}
        self._open: list[tuple[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "body":
            self.body = attrs
        if attrs.get("id"):
            self.ids[attrs["id"]] = {"attrs": attrs, "text": ""}
        if tag not in self.VOID:
            self._open.append((tag, attrs.get("id")))

    def handle_endtag(self, tag):
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data):
        for tag, ident in self._open:
            if ident and tag != "script":
                self.ids[ident]["text"] += data


@pytest.fixture(scope="module")
def chromium() -> str:
    return find_chromium()


def browse(chromium: str, page: Path, *args: str, fragment: str = "") -> subprocess.CompletedProcess:
    profile = page.parent / f".chromium-{page.stem}-{len(args)}"
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri() + fragment],
                          capture_output=True, text=True, timeout=180)


def console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if "CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


@pytest.fixture(scope="module")
def shown(chromium, evaluated, tmp_path_factory):
    """The prediction folder's page, its DOM once the viewer drew, and a screenshot with the kidney
    class hidden (by the link: #hide=2)."""
    folder = tmp_path_factory.mktemp("browser")
    page = write_report(evaluated, folder / "report.html")
    dom = browse(chromium, page, "--dump-dom")
    shot = folder / "shot.png"
    capture = browse(chromium, page, f"--screenshot={shot}", fragment="#hide=2")
    assert shot.is_file(), capture.stderr[-2000:]
    return page, dom, shot


def test_page_opens_offline_without_errors_and_the_viewer_draws(shown):
    _, dom, _ = shown
    parsed = Dom(dom.stdout)
    assert parsed.ids["page-errors"]["text"] == "" and "hidden" in parsed.ids["page-errors"]["attrs"]
    assert not console_errors(dom.stderr), console_errors(dom.stderr)
    assert parsed.body.get("data-viewer") == "ready", parsed.ids["viewer-message"]["text"]
    assert "hidden" in parsed.ids["viewer-message"]["attrs"]
    assert "phantom_000_ct" in parsed.ids["case-info"]["text"]
    assert "liver" in parsed.ids["case-scores"]["text"]  # the case's scores beside the viewer


def test_viewer_canvas_is_not_blank_and_shows_the_overlay_colours_of_visible_classes(shown):
    from PIL import Image

    _, dom, shot = shown
    x, y, w, h = (int(v) for v in Dom(dom.stdout).body["data-canvas"].split(","))
    assert w > 400 and h > 400
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)[y:y + h, x:x + w]
    grey = pixels.mean(axis=2)
    image = (pixels.max(axis=2) - pixels.min(axis=2) < 16) & (grey > 40)  # grey voxels of the image
    assert grey.std() > 20 and image.mean() > 0.05, f"the viewer's canvas is blank ({image.mean():.3f} image pixels)"
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    red = (r - g > 60) & (r - b > 40)  # liver (230, 25, 75) at half opacity over grey
    green = (g - r > 50) & (g - b > 40)  # kidney (60, 180, 75): in these slices (hundreds of pixels), but hidden
    assert red.sum() > 300, f"liver's colour not in the viewer ({red.sum()} pixels)"
    assert green.sum() < 10, f"kidney is hidden, yet its colour is in the viewer ({green.sum()} pixels)"
    assert 'data-class="2"' in dom.stdout and "kidney" in dom.stdout  # still in the legend, unticked


def test_a_volume_missing_from_the_page_shows_a_clear_message_not_a_blank_viewer(chromium, shown, tmp_path):
    page, _, _ = shown
    missing = tmp_path / "missing.html"
    missing.write_text(re.sub(r'<script type="application/octet-stream" id="volume-0">[^<]*</script>', "",
                              page.read_text()))
    dom = Dom(browse(chromium, missing, "--dump-dom").stdout)
    assert dom.body.get("data-viewer") == "message" and "hidden" not in dom.ids["viewer-message"]["attrs"]
    assert ("Case phantom_000_ct cannot be shown: its image could not be read (its data is not on this page)"
            in dom.ids["viewer-message"]["text"])
    assert "hidden" in dom.ids["canvas-box"]["attrs"]  # no black canvas where the message stands


@pytest.mark.slow
def test_an_input_gone_before_the_report_and_a_damaged_layer_are_named_in_the_viewer(chromium, shown, dataset,
                                                                                     tmp_path):
    gone = predict_like(tmp_path / "gone", dataset, cases=1, images=tmp_path / "inputs")
    shutil.rmtree(tmp_path / "inputs")
    dom = Dom(browse(chromium, write_report(gone, tmp_path / "gone.html"), "--dump-dom").stdout)
    assert dom.body.get("data-viewer") == "message" and "hidden" in dom.ids["canvas-box"]["attrs"]
    assert "Case phantom_000_ct cannot be shown: image not found: " in dom.ids["viewer-message"]["text"]

    page, _, _ = shown
    damaged = tmp_path / "damaged.html"
    damaged.write_text(re.sub(r'(id="volume-2">)[^<]*', r"\1bm90IGEgbmlmdGk=", page.read_text()))
    dom = Dom(browse(chromium, damaged, "--dump-dom").stdout)
    assert dom.body.get("data-viewer") == "message" and "hidden" not in dom.ids["canvas-box"]["attrs"]
    assert "Not shown for case phantom_000_ct: prediction: could not be read" in dom.ids["viewer-message"]["text"]


def test_the_label_is_drawn_as_an_outline_over_filled_predictions(evaluated):
    from swinssl.report.volumes import outline_of

    cube = np.zeros((7, 7, 7), np.uint8)
    cube[1:6, 1:6, 1:6] = 2
    cube[3, 3, 5] = 1  # another class inside: both sides of that border are kept
    edge = outline_of(cube)
    assert edge[3, 3, 3] == 0 and edge[2, 2, 2] == 0  # inside: not drawn
    assert edge[1, 3, 3] == 2 and edge[5, 3, 3] == 2 and edge[3, 1, 3] == 2  # each face, each axis
    assert edge[3, 3, 5] == 1 and edge[3, 3, 4] == 2 and edge[0, 3, 3] == 0
    full = np.ones((4, 4, 4), np.uint8)
    assert not outline_of(full).any()  # the volume's own edge is no boundary

    report = collect(evaluated)
    text = render(report, max_side=64)
    data = json.loads(re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text,
                                re.S).group(1))
    volume = lambda vid: np.asarray(decode(re.search(rf'id="{vid}">(.*?)</script>', text, re.S).group(1)).dataobj)
    case = next(c for c in report.cases if c.case_id == data["cases"][0]["id"])
    files = {layer.name: np.asarray(nib.load(layer.path).dataobj) for layer in case.layers}
    shown = {layer["name"]: volume(layer["volume"]) for layer in data["cases"][0]["layers"]}
    np.testing.assert_array_equal(shown["label"], outline_of(files["label"]))  # the label: its contours
    assert 0 < (shown["label"] > 0).sum() < (files["label"] > 0).sum()  # hollow
    for name in set(shown) - {"label"}:
        np.testing.assert_array_equal(shown[name], files[name])  # predictions: filled, as predicted
    assert "label (outline)" in text
