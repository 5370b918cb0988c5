"""Studies end to end at micro size (CPU): every cell runs, the report has every row, and a
second run reuses the finished stages instead of training again."""

import json

import pytest

from swinssl import study

MICRO = {
    "cases": 4,
    "size": 32,
    "methods": {"swin_unetr": "pretrain/swin_unetr_tiny", "swinfuse": "pretrain/swinfuse_tiny"},
    "pretrain": ["model.depths=[1,1,1,1]", "preprocess.roi_size=[64,32,32]", "preprocess.num_crops=1",
                 "preprocess.spacing=null", "train.steps=2", "train.warmup_steps=1", "train.num_workers=0",
                 "train.val_every=2", "train.checkpoint_every=2", "train.log_every=1"],
    "finetune": ["model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1", "train.steps=2",
                 "train.warmup_steps=1", "train.num_workers=0", "train.val_every=2", "train.checkpoint_every=2",
                 "train.log_every=1", "finetune.overlap=0"],
}


def test_modality_study_runs_every_cell_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "micro", MICRO)
    report = study.run_modality_study(tmp_path, preset="micro", progress=False)
    rows = json.loads((tmp_path / "results.json").read_text())
    cells = {(r["init"], r["trained_on"], r["tested_on"]) for r in rows}
    assert cells == {(i, a, b) for i in ("scratch", "swin_unetr", "swinfuse") for a in ("CT", "MRI") for b in ("CT", "MRI")}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    text = report.read_text()
    assert text.count("| swinfuse |") == 2 and "Out-of-modality" in text
    # The fine-tuning from SwinFUSE kept the domain-invariance module.
    from swinssl.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tmp_path / "finetune_swinfuse_CT" / "checkpoints" / "last.pt")
    assert ckpt["plan"]["network"]["domain_invariance"] is True
    assert any(".dim." in k for k in ckpt["model"])

    # Run again: everything is reused, nothing trains.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(study, "pretrain", refuse)
    monkeypatch.setattr(study, "finetune", refuse)
    monkeypatch.setattr(study, "predict", refuse)
    study.run_modality_study(tmp_path, preset="micro", progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == rows


def test_unknown_study_preset_is_refused(tmp_path):
    from swinssl.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        study.run_modality_study(tmp_path, preset="huge")
