"""Exported predictors (swinssl export --out FILE.onnx | FILE.pt2; swinssl predict FILE): parity of the
window network with PyTorch, the plan in the metadata, a whole prediction through the file against the
checkpoint, and the one-line refusals.

A tiny SwinUNETR fine-tuned for a few steps on the session's CT phantoms is exported once per module,
through the CLI; SwinMM and SwinFUSE networks (random weights) are exported in the slow tests (a
SwinMM ONNX export takes minutes on two cores).
"""

import copy
import dataclasses
import json
import sys
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import ModelConfig, PreprocessConfig, load_config
from swinssl.data.discover import find_dataset
from swinssl.data.transforms import case_item
from swinssl.errors import CheckpointError, ConfigError, DependencyError
from swinssl.infer import (PredictOptions, inference_pipeline, load_ensemble, load_exported, load_model, predict,
                           predict_volume)
from swinssl.methods import method_of
from swinssl.infer.export import WindowNetwork, export_predictor
from swinssl.infer.exported import exported_views
from swinssl.nn.build import build_network
from swinssl.plan import Plan
from swinssl.runs import resolve_checkpoint

runner = CliRunner()
TOLERANCE = 1e-4  # max |logit difference|, float32
ROI = 32
CASE = "phantom_003_ct.nii.gz"  # the held-out CT phantom of the session's dataset


def needs_onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


def windows(batch: int, channels: int = 1, seed: int = 0) -> torch.Tensor:
    """Random windows, the last quarter of each zero (as padding at a volume's border)."""
    x = torch.randn((batch, channels, ROI, ROI, ROI), generator=torch.Generator().manual_seed(seed))
    x[..., 3 * ROI // 4:] = 0
    return x


def max_difference(predictor, window: WindowNetwork, batch: int) -> float:
    x = windows(batch, seed=batch)
    with torch.no_grad():
        got, want = predictor(x), window(x)
    assert got.shape == want.shape == (batch, want.shape[1], ROI, ROI, ROI)
    return (got - want).abs().max().item()


# --- a fine-tuned tiny SwinUNETR, exported once ----------------------------------------------------------------


@pytest.fixture(scope="module")
def run(phantoms, tmp_path_factory):
    """A tiny SwinUNETR fine-tuned for 4 steps on the session's 64^3 CT phantoms (32^3 crops)."""
    from swinssl.engine.finetune import finetune

    out = tmp_path_factory.mktemp("export_run")
    cfg = load_config("finetune/tiny", [
        f"data={phantoms / 'dataset.json'}", f"train.out={out}", "train.name=ft", "model.depths=[1,1,1,1]",
        f"preprocess.roi_size={ROI}", "preprocess.num_crops=1", "train.num_workers=0", "train.steps=4",
        "train.val_every=1000", "train.checkpoint_every=4", "train.log_every=4", "train.warmup_steps=1",
        "finetune.overlap=0", "preprocess.augment=false",
    ])
    return finetune(cfg, progress=False)


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run exported through the CLI as .onnx (when onnx is installed) and .pt2: {suffix: path}."""
    out = tmp_path_factory.mktemp("exported")
    files = {}
    suffixes = [".pt2"]
    if all(_importable(n) for n in ("onnx", "onnxscript", "onnxruntime")):
        suffixes.insert(0, ".onnx")
    for suffix in suffixes:
        result = runner.invoke(app, ["export", str(run), "--out", str(out / f"model{suffix}")])
        assert result.exit_code == 0, result.output
        files[suffix] = out / f"model{suffix}"
    return files


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def exported_file(exported, suffix):
    if suffix not in exported:
        needs_onnx()
    return exported[suffix]


@pytest.fixture(scope="module")
def pt2_predictor(exported):
    return load_exported(exported[".pt2"])[0]


@pytest.fixture(scope="module")
def window(run):
    model, plan = load_model(run)
    return WindowNetwork(model, method_of(plan)).eval()


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_exported_windows_match_pytorch_at_batch_1_and_3(exported, window, pt2_predictor, suffix):
    predictor = pt2_predictor if suffix == ".pt2" else load_exported(exported_file(exported, suffix))[0]
    for batch in (1, 3):  # the batch axis is dynamic: traced with 2
        assert max_difference(predictor, window, batch) <= TOLERANCE


def test_onnx_instance_norm_keeps_half_padded_windows_within_1e_5(exported, window):
    """Windows half zero padding, half tissue around 3: with onnxruntime's own InstanceNormalization (one
    float32 accumulator per channel) the logits were 4.6e-5 off; with the norm taken by axes (infer.export)
    2e-6."""
    predictor, _ = load_exported(exported_file(exported, ".onnx"))
    x = windows(3, seed=7) + 3
    x[..., ROI // 2:] = 0
    with torch.no_grad():
        assert (predictor(x) - window(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_metadata_holds_the_plan_views_and_window(exported, run, pt2_predictor, suffix):
    import swinssl

    predictor = pt2_predictor if suffix == ".pt2" else load_exported(exported_file(exported, suffix))[0]
    plan = predictor.plan
    _, trained = load_model(run)
    assert plan.to_dict() == trained.to_dict()  # the whole plan, provenance included
    assert (predictor.views, predictor.roi) == ("single", (ROI, ROI, ROI))
    meta = _metadata(predictor.path)
    assert meta["swinssl.format"] == "swinssl-predictor" and meta["swinssl.format_version"] == "1"
    assert meta["swinssl.version"] == swinssl.__version__
    assert meta["swinssl.source"] == str(resolve_checkpoint(run))


def _metadata(path) -> dict:
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    with zipfile.ZipFile(path) as archive:
        return {n.rsplit("/", 1)[1]: archive.read(n).decode() for n in archive.namelist() if "/extra/" in n}


def test_flipped_sliding_windows_through_the_file_match_the_checkpoint(exported, run, phantoms):
    """predict_volume with test-time flips: the ONNX file's softmax equals the checkpoint's."""
    predictor, plan = load_exported(exported_file(exported, ".onnx"))
    model, _ = load_model(run)
    case = dataclasses.replace(find_dataset(phantoms / "imagesTs" / CASE).cases[0], modality="CT")
    image = inference_pipeline(plan)({**case_item(case), "label": None})["image"][:, :ROI, :ROI, 8:ROI + 16]
    got, want = (predict_volume(m, image, (ROI,) * 3, overlap=0.5, flips=True) for m in (predictor, model))
    assert (got - want).abs().max().item() <= TOLERANCE
    unflipped = predict_volume(model, image, (ROI,) * 3, overlap=0.5)
    assert (unflipped - want).abs().max().item() > 100 * TOLERANCE  # the flips matter for this network


def test_whole_predict_through_onnx_writes_the_checkpoints_masks(exported, run, phantoms, tmp_path):
    """swinssl predict model.onnx: the same preprocessing, windows, blending and inversion as the checkpoint
    (flips: test_flipped_sliding_windows_through_the_file_match_the_checkpoint)."""
    onnx_file = exported_file(exported, ".onnx")
    case = phantoms / "imagesTs" / CASE
    want = predict(run, case, tmp_path / "checkpoint", PredictOptions(cache="off"), progress=False)[0]
    result = runner.invoke(app, ["predict", str(onnx_file), str(case), "--out", str(tmp_path / "onnx"),
                                 "--cache", "off"])
    assert result.exit_code == 0, result.output
    got = nib.load(str(tmp_path / "onnx" / want.name))
    want = nib.load(str(want))
    assert got.shape == want.shape == nib.load(str(case)).shape and np.allclose(got.affine, want.affine)
    # The softmax agrees within 1e-6; the argmax can differ only where the checkpoint's two top classes are
    # that close (ties fp32 rounding decides): a network fine-tuned for 4 steps has a handful of such voxels
    # (1 of the 262,144 differed when this was written). At most 1e-4 of the voxels may differ.
    got, want = np.asarray(got.dataobj), np.asarray(want.dataobj)
    assert (got != want).mean() <= 1e-4
    assert len(np.unique(want)) > 2  # the network predicts organs, not all background
    record = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert record["models"] == [str(onnx_file.resolve())]
    assert record["options"]["views"] == "single" and record["options"]["roi_size"] == [ROI] * 3
    assert record["labels"] == json.loads((tmp_path / "checkpoint" / "predictions.json").read_text())["labels"]


def test_exported_files_ensemble_with_one_plan(exported, run):
    sources = [exported_file(exported, ".onnx"), exported_file(exported, ".pt2"), run]
    models, plan, files = load_ensemble(sources)
    assert [type(m).__name__ for m in models] == ["OnnxPredictor", "Pt2Predictor", "SwinUNETR"]
    assert files[:2] == sources[:2]
    assert exported_views(models, "auto", (ROI,) * 3) == "single" and plan.out_channels == 5


def test_help_names_the_formats_and_the_extra():
    wide = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    helped = " ".join(runner.invoke(app, ["export", "--help"], env=wide).output.split())
    assert all(s in helped for s in (".safetensors", ".onnx", ".pt2", 'pip install "swinssl[onnx]"', "--views"))
    helped = " ".join(runner.invoke(app, ["predict", "--help"], env=wide).output.split())
    assert "exported by swinssl export (.onnx or .pt2" in helped and "--views or --roi is refused" in helped


# --- refusals, each one line -------------------------------------------------------------------------------------


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_export_to_another_suffix_lists_the_three(run, tmp_path):
    line = one_line_error(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "model.bin")]))
    assert "model.bin" in line and all(s in line for s in (".safetensors", ".onnx", ".pt2"))
    assert not (tmp_path / "model.bin").exists()


def test_export_of_a_pretraining_checkpoint_is_refused(tmp_path):
    plan = Plan(network=ModelConfig(feature_size=12, depths=(1, 1, 1, 1)), preprocess=PreprocessConfig())
    torch.save({"format": "swinssl", "kind": "pretrain", "model": {}, "plan": plan.to_dict()}, tmp_path / "pre.pt")
    line = one_line_error(runner.invoke(app, ["export", str(tmp_path / "pre.pt"), "--out", str(tmp_path / "m.pt2")]))
    assert "pre.pt" in line and "fine-tune it first" in line


def test_other_views_or_window_size_than_exported_are_refused_naming_the_file(exported, pt2_predictor, phantoms,
                                                                             tmp_path):
    pt2_file = exported_file(exported, ".pt2")
    case = str(phantoms / "imagesTs" / CASE)
    line = one_line_error(runner.invoke(app, ["predict", str(pt2_file), case, "--out", str(tmp_path / "a"),
                                              "--views", "fused"]))
    assert str(pt2_file) in line and "'single'" in line and "--views single" in line
    line = one_line_error(runner.invoke(app, ["predict", str(pt2_file), case, "--out", str(tmp_path / "b"),
                                              "--roi", "48"]))
    assert str(pt2_file) in line and "32x32x32" in line
    with pytest.raises(ConfigError, match="exported with views 'single', not 'swap_xy'"):
        predict_volume(pt2_predictor, torch.zeros(1, 40, 40, 40), ROI, views="swap_xy")
    with pytest.raises(ConfigError, match="predictors run on the CPU"):
        load_exported(pt2_file, device="cuda")


def test_ensemble_of_files_with_different_views_is_refused(pt2_predictor):
    other = copy.copy(pt2_predictor)
    other.views = "fused"
    with pytest.raises(ConfigError, match="an ensemble predicts through one views choice"):
        exported_views([pt2_predictor, other], "auto", (ROI,) * 3)
    assert exported_views([pt2_predictor, pt2_predictor], "single", (ROI,) * 3) == "single"


def test_onnx_without_or_with_corrupt_metadata_is_refused_naming_the_file(exported, phantoms, tmp_path):
    source = exported_file(exported, ".onnx")
    import onnx

    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    case = str(phantoms / "imagesTs" / CASE)
    line = one_line_error(runner.invoke(app, ["predict", str(tmp_path / "bare.onnx"), case, "-o", str(tmp_path / "o")]))
    assert str(tmp_path / "bare.onnx") in line and "no swinssl plan in its metadata" in line
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == "swinssl.plan":
            prop.value = prop.value[:40]
    onnx.save(model, str(tmp_path / "cut.onnx"))
    with pytest.raises(CheckpointError, match="cut.onnx: corrupt swinssl metadata"):
        load_exported(tmp_path / "cut.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CheckpointError, match="junk.onnx: onnxruntime cannot load it"):
        load_exported(tmp_path / "junk.onnx")


def test_pt2_without_metadata_or_with_pickles_is_refused(exported, tmp_path):
    program = torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),))
    torch.export.save(program, str(tmp_path / "bare.pt2"))
    with pytest.raises(CheckpointError, match="bare.pt2: no swinssl plan in its metadata"):
        load_exported(tmp_path / "bare.pt2")
    # The same archive as swinssl wrote it, but one weight marked as pickled: torch.export.load would unpickle it.
    source = exported_file(exported, ".pt2")
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(tmp_path / "pickled.pt2", "w") as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"]))
                config["config"][first]["use_pickle"] = True
                data = json.dumps(config).encode()
            out.writestr(info, data)
    with pytest.raises(CheckpointError, match="pickled.pt2: it holds .* as a pickled object"):
        load_exported(tmp_path / "pickled.pt2")
    (tmp_path / "junk.pt2").write_bytes(b"not an archive")
    with pytest.raises(CheckpointError, match="junk.pt2: not a readable torch.export archive"):
        load_exported(tmp_path / "junk.pt2")


def test_missing_onnxruntime_names_the_extra(exported, monkeypatch, tmp_path):
    onnx_file = exported_file(exported, ".onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(DependencyError, match=r'pip install "swinssl\[onnx\]"'):
        load_exported(onnx_file)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(DependencyError, match=r'needs the onnxscript package: pip install "swinssl\[onnx\]"'):
        export_predictor(tmp_path / "missing.pt", tmp_path / "m.onnx")


# --- SwinMM and SwinFUSE networks ----------------------------------------------------------------------------------


def write_checkpoint(path, **network):
    """A fine-tuning checkpoint (random weights) of a tiny network with ``network`` fields."""
    plan = Plan(network=ModelConfig(feature_size=12, depths=(1, 1, 1, 1), **network),
                preprocess=PreprocessConfig(roi_size=(ROI,) * 3), out_channels=3,
                labels={"0": "background", "1": "a", "2": "b"}, modality="CT")
    torch.manual_seed(0)
    model = build_network(plan.network_fields())
    torch.save({"format": "swinssl", "kind": "finetune", "model": model.state_dict(), "plan": plan.to_dict()}, path)
    return path


def test_export_bakes_the_views_choice(tmp_path):
    """--views swap_xy on a plain SwinUNETR: the file computes the window through that axis order."""
    checkpoint = write_checkpoint(tmp_path / "plain.pt")
    predictor, _ = load_exported(export_predictor(checkpoint, tmp_path / "swapped.pt2", views="swap_xy"))
    model, plan = load_model(checkpoint)
    assert predictor.views == "swap_xy"
    assert max_difference(predictor, WindowNetwork(model, method_of(plan), "swap_xy").eval(), 2) <= TOLERANCE
    assert max_difference(predictor, WindowNetwork(model, method_of(plan), "single").eval(), 2) > TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
@pytest.mark.parametrize("network", [{"multiview": True}, {"encoder": "domain_invariant_swin"}], ids=["swinmm", "swinfuse"])
def test_multiview_and_dim_networks_export_and_match_pytorch(tmp_path, network, suffix):
    """SwinMM: the three view pairs fused (its default views); SwinFUSE: the DIM gets the window in both streams."""
    if suffix == ".onnx":
        needs_onnx()
    checkpoint = write_checkpoint(tmp_path / "model.pt", **network)
    predictor, plan = load_exported(export_predictor(checkpoint, tmp_path / f"model{suffix}"))
    model, trained = load_model(checkpoint)
    assert plan.to_dict() == trained.to_dict()
    assert predictor.views == ("fused" if network.get("multiview") else "single")
    window = WindowNetwork(model, method_of(plan)).eval()
    for batch in (1, 3):
        assert max_difference(predictor, window, batch) <= TOLERANCE
