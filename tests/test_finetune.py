"""Segmentation fine-tuning end to end on phantoms (tiny model, CPU), and its data/optimiser helpers."""

from pathlib import Path

import pytest
import torch

from swinssl.config import FinetuneConfig, load_config, to_dict
from swinssl.data.discover import Case, Dataset
from swinssl.engine import finetune as engine
from swinssl.engine.checkpoint import load_checkpoint, save_checkpoint
from swinssl.engine.logging import read_metrics
from swinssl.errors import ConfigError, DataError
from swinssl.methods.swin_unetr import SSLModel
from swinssl.nn import build_network

TINY = [
    "model.feature_size=12", "model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1",
    "train.num_workers=0", "train.log_every=1", "train.val_every=2", "train.checkpoint_every=2",
    "train.warmup_steps=1", "finetune.overlap=0",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=5, size=32, seed=2)
    return out / "dataset.json"


def tiny_config(data, out, name, *extra):
    return load_config("finetune/tiny", [f"data={data}", f"train.out={out}", f"train.name={name}", *TINY, *extra])


def test_run_directory_checkpoints_and_plan(phantoms, tmp_path):
    run = engine.finetune(tiny_config(phantoms, tmp_path, "a", "train.steps=2"), progress=False)
    for name in ("config.yaml", "manifest.json", "metrics.csv", "checkpoints/best.pt", "checkpoints/last.pt",
                 "previews/step_0000002.png"):
        assert (run / name).is_file(), name
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    plan = ckpt["plan"]
    assert ckpt["kind"] == "finetune" and ckpt["step"] == 2
    assert plan["network"]["out_channels"] == 5
    assert plan["labels"] == {"0": "background", "1": "liver", "2": "kidney", "3": "spleen", "4": "lesion"}
    assert plan["modality"] == "CT"
    val = {r["name"]: r["value"] for r in read_metrics(run) if r["split"] == "val"}
    assert {"dice", "dice_liver", "dice_lesion"} <= set(val)
    assert all(0.0 <= v <= 1.0 for v in val.values())
    # The test cases of the dataset are never trained or validated on.
    manifest = (run / "manifest.json").read_text()
    assert "phantom_004" not in manifest and "phantom_000" in manifest


def test_resume_after_interruption_matches_uninterrupted_run(phantoms, tmp_path, monkeypatch):
    full = engine.finetune(tiny_config(phantoms, tmp_path, "full", "train.steps=4"), progress=False)
    calls = {"n": 0}
    real = engine.images_of

    def interrupted(batch):
        calls["n"] += 1
        if calls["n"] == 3:  # third training step: after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(batch)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "images_of", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.finetune(tiny_config(phantoms, tmp_path, "cut", "train.steps=4"), progress=False)
    cut = tmp_path / "cut"
    assert load_checkpoint(cut / "checkpoints" / "last.pt")["step"] == 2
    engine.finetune(resume=cut, progress=False)
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (full, cut))
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-6, msg=key)


def _pretrain_checkpoint(path: Path) -> Path:
    """A swinssl pre-training checkpoint of a feature-12 encoder with recognisable weights."""
    cfg = load_config(None, ["model.feature_size=12", "model.depths=[1,1,1,1]"])
    ssl = SSLModel(cfg.model, cfg.method)
    with torch.no_grad():
        ssl.swinViT.patch_embed.proj.weight.fill_(0.125)
    return save_checkpoint(path, {"format": "swinssl", "kind": "pretrain", "step": 1, "model": ssl.state_dict(),
                                  "plan": {"network": {**to_dict(cfg.model), "patch_size": 2}}})


def test_pretrained_plan_is_adopted_and_encoder_loaded(phantoms, tmp_path, capsys):
    source = _pretrain_checkpoint(tmp_path / "pre" / "checkpoints" / "last.pt")
    # feature 24 in the config: the plan's 12 wins (the weights only fit it), and it is said.
    cfg = tiny_config(phantoms, tmp_path, "ft", "model.feature_size=24", f"finetune.pretrained={tmp_path / 'pre'}",
                      "train.steps=1", "train.lr=0", "train.weight_decay=0")
    run = engine.finetune(cfg, progress=False)
    said = capsys.readouterr().out
    assert "feature_size 24 -> 12" in said and "loaded" in said
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["plan"]["network"]["feature_size"] == 12
    assert torch.all(ckpt["model"]["swinViT.patch_embed.proj.weight"] == 0.125)  # lr 0: still the loaded weights


def test_label_ratio_gives_nested_seeded_subsets_and_explicit_cases():
    cases = [Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"l{i}.nii.gz")) for i in range(10)]
    pick = lambda ratio, seed=0: [c.case_id for c in engine.label_subset(cases, FinetuneConfig(label_ratio=ratio), seed)]  # noqa: E731
    assert len(pick(0.1)) == 1 and len(pick(0.3)) == 3 and len(pick(1.0)) == 10
    assert set(pick(0.1)) <= set(pick(0.3)) <= set(pick(0.5))
    assert pick(0.3) == pick(0.3) and pick(0.3, seed=1) != pick(0.3, seed=0)
    assert [c.case_id for c in engine.label_subset(cases, FinetuneConfig(cases=["c7", "c2"]), 0)] == ["c7", "c2"]
    with pytest.raises(ConfigError, match=r"finetune.cases: \['nope'\] are not labelled training cases"):
        engine.label_subset(cases, FinetuneConfig(cases=["nope"]), 0)
    with pytest.raises(ConfigError, match="label_ratio must be in"):
        engine.label_subset(cases, FinetuneConfig(label_ratio=0), 0)


def test_k_fold_splits_partition_the_labelled_cases():
    cases = [Case(f"c{i}", (Path(f"c{i}.nii.gz"),), Path(f"l{i}.nii.gz")) for i in range(7)]
    cases.append(Case("t", (Path("t.nii.gz"),), Path("lt.nii.gz"), split="test"))
    dataset = Dataset(Path("."), "msd", cases)
    held = []
    for fold in range(3):
        train, val = engine.finetune_split(dataset, FinetuneConfig(folds=3, fold=fold), 0.2, seed=0)
        assert not {c.case_id for c in train} & {c.case_id for c in val}
        assert len(train) + len(val) == 7
        held += [c.case_id for c in val]
    assert sorted(held) == [f"c{i}" for i in range(7)]  # every case held out exactly once, never the test case
    with pytest.raises(ConfigError, match="need 0 <= fold < folds"):
        engine.finetune_split(dataset, FinetuneConfig(folds=3, fold=3), 0.2, seed=0)
    with pytest.raises(DataError, match="no labelled training cases"):
        engine.finetune_split(Dataset(Path("x"), "folder", [Case("u", (Path("u.nii.gz"),))]), FinetuneConfig(), 0.2, 0)


def test_layer_decay_scales_encoder_stages():
    cfg = load_config(None, ["model.feature_size=12", "model.depths=[1,1,1,1]"])
    model = build_network(cfg.model, out_channels=3)
    groups = engine.layer_decay_groups(model, lr=1.0, decay=0.5)
    lrs = sorted(g["lr"] for g in groups)
    assert lrs == [0.5**5, 0.5**4, 0.5**3, 0.5**2, 0.5, 1.0]
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_id[id(model.swinViT.patch_embed.proj.weight)] == 0.5**5
    assert by_id[id(model.swinViT.layers4[0].downsample.reduction.weight)] == 0.5
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert len(engine.layer_decay_groups(model, lr=1.0, decay=1.0)) == 1
