"""Studies end to end at micro size (CPU): every cell runs, the report has every row, and a
second run reuses the finished stages instead of training again."""

import json
from pathlib import Path

import pytest

from swinssl.results import EvaluationFolder, read_results
from swinssl.workflows import study

PRESETS = Path(__file__).parent / "presets"  # micro-size overlays, as configs/study/ has for tiny and full
MICRO = {
    "cases": 4,
    "size": 32,
    "methods": {"swin_unetr": "pretrain/swin_unetr_tiny", "swinfuse": "pretrain/swinfuse_tiny"},
    "pretrain": str(PRESETS / "micro_pretrain.yaml"),
    "finetune": str(PRESETS / "micro_finetune.yaml"),
}


def test_modality_study_runs_every_cell_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "micro", MICRO)
    report = study.run_modality_study(tmp_path, preset="micro", progress=False)
    rows = read_results(tmp_path)["rows"]
    cells = {(r["init"], r["trained_on"], r["tested_on"]) for r in rows}
    assert cells == {(i, a, b) for i in ("scratch", "swin_unetr", "swinfuse") for a in ("CT", "MRI") for b in ("CT", "MRI")}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    text = report.read_text()
    assert text.count("| swinfuse |") == 2 and "Out-of-modality" in text
    # The fine-tuning from SwinFUSE kept the domain-invariance module.
    from swinssl.checkpoint import read_checkpoint

    ckpt = read_checkpoint(tmp_path / "finetune_swinfuse_CT" / "checkpoints" / "last.pt")
    assert ckpt["plan"]["network"]["encoder"] == "domain_invariant_swin"
    assert any(".invariance." in k for k in ckpt["model"])

    # Run again: everything is reused, nothing trains.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(study, "pretrain", refuse)
    monkeypatch.setattr(study, "finetune", refuse)
    monkeypatch.setattr(study, "predict", refuse)
    study.run_modality_study(tmp_path, preset="micro", progress=False)
    assert read_results(tmp_path)["rows"] == rows


def test_unknown_study_preset_is_refused(tmp_path):
    from swinssl.errors import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        study.run_modality_study(tmp_path, preset="huge")


@pytest.mark.slow  # make test-slow: 1 pre-training + 4 fine-tunings
def test_data_efficiency_study_runs_every_cell_reports_and_resumes(tmp_path, monkeypatch):
    micro = {"cases": 5, "size": 32, "ratios": [0.5, 1.0], "seeds": [0],
             "pretrain": str(PRESETS / "micro_pretrain_64.yaml"), "finetune_config": "finetune/tiny",
             "finetune": MICRO["finetune"]}
    monkeypatch.setitem(study.EFFICIENCY, "micro", micro)
    report = study.run_data_efficiency_study("pretrain/swin_unetr_tiny", out=tmp_path, preset="micro", progress=False)
    results = read_results(tmp_path)
    rows = results["runs"]
    assert {(r["init"], r["ratio"], r["seed"]) for r in rows} == {
        (i, r, 0) for i in ("scratch", "swin_unetr") for r in (0.5, 1.0)}
    # 5 phantoms: 1 test case, 1 of the other 4 validates, so 3 labelled training cases; half of them is 2.
    assert {r["ratio"]: r["train_cases"] for r in rows} == {0.5: 2, 1.0: 3}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    text = report.read_text()
    assert text.count("| 50% | 2 |") == 2 and text.count("| 100% | 3 |") == 2 and "Gain of `swin_unetr`" in text
    assert "| 1 |\n" in text  # one seed per cell
    # One test case and one seed: one pair per ratio, which can never show an effect.
    assert {k: v["n"] for k, v in results["verdicts"].items()} == {"0.5": 1, "1": 1}
    assert text.count("no detectable difference") == 2 and "device-hours" in text
    assert results["pretraining"]["device_hours"] > 0 and results["pretraining"]["devices"] == 1
    assert (tmp_path / "dice_vs_label_ratio.png").read_bytes()[:4] == b"\x89PNG"
    # The pre-trained fine-tunings started from the pre-training's encoder.
    assert "pretrained: ''" in (tmp_path / "finetune_scratch_ratio050_seed0" / "config.yaml").read_text()
    assert str(tmp_path / "pretrain") in (tmp_path / "finetune_swin_unetr_ratio050_seed0" / "config.yaml").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(study, "pretrain", refuse)
    monkeypatch.setattr(study, "finetune", refuse)
    monkeypatch.setattr(study, "predict", refuse)
    study.run_data_efficiency_study("pretrain/swin_unetr_tiny", out=tmp_path, preset="micro", progress=False)
    assert read_results(tmp_path) == results


@pytest.mark.slow  # make test-slow: 1 pre-training + 4 two-view fine-tunings (about 5 minutes on 2 cores)
def test_data_efficiency_semi_protocol_trains_both_stages_never_reads_left_out_labels_and_resumes(tmp_path,
                                                                                                 monkeypatch):
    from swinssl.data import io
    from swinssl.data.discover import find_dataset
    from swinssl.data import splits
    from swinssl.checkpoint import read_checkpoint

    micro = {"cases": 5, "size": 32, "ratios": [0.5], "seeds": [0],
             "pretrain": str(PRESETS / "micro_pretrain_64.yaml"), "finetune_config": "finetune/tiny",
             "semi_finetune_config": "finetune/swinmm_tiny", "finetune": MICRO["finetune"]}
    monkeypatch.setitem(study.EFFICIENCY, "micro", micro)
    read = set()  # every volume file read, by any stage

    def spy(real):
        def reader(path, *args, **kwargs):
            read.add(Path(path).resolve())
            return real(path, *args, **kwargs)
        return reader

    monkeypatch.setattr(io, "read_volume", spy(io.read_volume))
    monkeypatch.setattr(splits, "read_volume", spy(splits.read_volume))
    report = study.run_data_efficiency_study("pretrain/swin_unetr_tiny", out=tmp_path, preset="micro", protocol="semi",
                                             progress=False)
    results = read_results(tmp_path)
    rows = results["runs"]
    assert results["protocol"] == "semi"
    # 5 phantoms: 1 test case, 1 of the other 4 validates, 3 are labelled training cases; half of them is 2,
    # which leaves 1 to the semi stage unlabelled (a ratio of 1 would leave none: test_swinmm tests that).
    assert {(r["init"], r["ratio"], r["stage"]): (r["train_cases"], r["unlabeled_cases"]) for r in rows} == {
        (i, 0.5, s): (2, 1 if s == "semi" else 0) for i in ("scratch", "swin_unetr") for s in ("base", "semi")}
    # The semi stage started from its base model, which started from the pre-training (or scratch).
    semi_plan = read_checkpoint(tmp_path / "finetune_swin_unetr_ratio050_seed0_semi" / "checkpoints" / "last.pt")["plan"]
    assert semi_plan["pretrained"] == str(tmp_path / "finetune_swin_unetr_ratio050_seed0_base")
    assert semi_plan["network"]["multiview"] is True
    base_plan = read_checkpoint(tmp_path / "finetune_swin_unetr_ratio050_seed0_base" / "checkpoints" / "last.pt")["plan"]
    assert base_plan["pretrained"] == str(tmp_path / "pretrain")
    # The left-out case was trained on through its image only: its label file was never read.
    manifest = json.loads((tmp_path / "finetune_scratch_ratio050_seed0_semi" / "manifest.json").read_text())
    (left,) = manifest["unlabeled"]
    assert len(left["files"]) == 1  # its image, no label
    label = next(c.label for c in find_dataset(tmp_path / "data" / "dataset.json").cases if c.case_id == left["case_id"])
    assert label.resolve() not in read and any("labelsTr" in str(p) for p in read)
    text = report.read_text()
    assert "| 50% | 2 | 1 | scratch | semi |" in text and "| 50% | 2 | 0 | swin_unetr | base |" in text
    assert set(results["stage_verdicts"]["0.5"]) == {"scratch", "swin_unetr"} and "Verdict of the semi stage" in text
    assert (tmp_path / "dice_vs_label_ratio.png").read_bytes()[:4] == b"\x89PNG"

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(study, "pretrain", refuse)
    monkeypatch.setattr(study, "finetune", refuse)
    monkeypatch.setattr(study, "predict", refuse)
    study.run_data_efficiency_study("pretrain/swin_unetr_tiny", out=tmp_path, preset="micro", protocol="semi",
                                    progress=False)
    assert read_results(tmp_path) == results


def test_efficiency_verdict_pairs_cases_and_seeds_and_reports_one_line_per_ratio(tmp_path):
    rng = __import__("numpy").random.default_rng(0)
    rows = []
    for seed in (0, 1):
        scratch = {f"case{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.7, 8))}
        for ratio, gain in ((0.1, 0.1), (1.0, 0.0)):
            noise = rng.normal(0, 0.01, 8)
            pre = {c: v + gain + float(e) for (c, v), e in zip(scratch.items(), noise)}
            for init, cases in (("scratch", scratch), ("swinmm", pre)):
                rows.append({"init": init, "ratio": ratio, "seed": seed, "dice": sum(cases.values()) / 8, "hd95": 1.0,
                             "train_cases": 2, "case_dice": cases})
    verdicts = study.efficiency_verdicts(rows, "swinmm")
    assert verdicts["0.1"]["n"] == 16 and verdicts["0.1"]["sentence"].startswith("pre-training helps: +0.09")
    assert verdicts["1"]["sentence"].startswith("no detectable difference")
    text = study.efficiency_report(rows, "swinmm", "data", tmp_path, verdicts,
                                   {"device_hours": 0.5, "wall_hours": 0.25, "devices": 2})
    assert "- 10%: pre-training helps: +0.09" in text and "- 100%: no detectable difference" in text
    assert "Pre-training cost 0.500 device-hours (0.250 h on 2 process(es))." in text


def _semi_rows(seeds=(0, 1), cases=8):
    """Synthetic results of the semi protocol: at 10% the semi stage adds 0.1 Dice to either init and
    pre-training adds 0.05 to the semi stage only; at 100% neither the stage nor pre-training adds anything."""
    rng = __import__("numpy").random.default_rng(0)
    rows = []
    for seed in seeds:
        scratch = {f"case{i}": float(v) for i, v in enumerate(rng.uniform(0.3, 0.7, cases))}
        for ratio, stage_gain, pre_gain, train, left in ((0.1, 0.1, 0.05, 2, 7), (1.0, 0.0, 0.0, 9, 0)):
            for init in ("scratch", "swinmm"):
                for stage in ("base", "semi"):
                    gain = (stage_gain if stage == "semi" else 0.0) + (
                        pre_gain if init == "swinmm" and stage == "semi" else 0.0)
                    dice = {c: v + gain + float(e) for (c, v), e in zip(scratch.items(), rng.normal(0, 0.01, cases))}
                    rows.append({"init": init, "ratio": ratio, "seed": seed, "stage": stage,
                                 "dice": sum(dice.values()) / cases, "hd95": 1.0, "train_cases": train,
                                 "unlabeled_cases": left if stage == "semi" else 0, "case_dice": dice})
    return rows


def test_semi_protocol_verdicts_pair_each_stage_with_its_base_and_inits_at_the_final_stage(tmp_path):
    rows = _semi_rows()
    stages = study.stage_verdicts(rows)
    assert set(stages) == {"0.1", "1"} and set(stages["0.1"]) == {"scratch", "swinmm"}
    assert stages["0.1"]["scratch"]["n"] == 16 and stages["0.1"]["scratch"]["sentence"].startswith("the semi stage helps")
    assert stages["0.1"]["scratch"]["mean"] == pytest.approx(0.10, abs=0.01)
    assert stages["0.1"]["swinmm"]["mean"] == pytest.approx(0.15, abs=0.01)
    assert stages["1"]["scratch"]["sentence"].startswith("no detectable difference")
    # Pre-trained against scratch: the semi stage's models only (the base stage shows no gain).
    verdicts = study.efficiency_verdicts(study.final_rows(rows), "swinmm")
    assert verdicts["0.1"]["n"] == 16 and verdicts["0.1"]["sentence"].startswith("pre-training helps")
    assert verdicts["0.1"]["mean"] == pytest.approx(0.05, abs=0.01)
    text = study.efficiency_report(rows, "swinmm", "data", tmp_path, verdicts, None, stages)
    assert "| label ratio | training cases | unlabelled cases | init | stage | Dice | HD95 | seeds |" in text
    assert "| 10% | 2 | 0 | scratch | base |" in text and "| 10% | 2 | 7 | scratch | semi |" in text
    assert "| 100% | 9 | 0 | swinmm | semi |" in text
    assert "- 10% (semi): +0.0" in text and "- 10% (base): " in text
    assert "Gain of the semi stage over its base" in text and "- 10%, swinmm: +0.1" in text
    assert "- 10%, scratch: the semi stage helps: +0.10" in text and "- 100%, scratch: no detectable" in text
    assert "Protocol `semi` (SwinMM Table 5)" in text and "--protocol semi`" in text


@pytest.mark.parametrize("protocol", study.PROTOCOLS)
def test_each_protocol_trains_its_stages_from_the_right_start(tmp_path, monkeypatch, protocol):
    """nested: one fine-tuning from the cell's start; semi: a two-view base from the cell's start, then a
    second stage from the base run with the left-out cases unlabelled, each tested (stages are faked)."""
    trained = []

    def fake_train(stage, cfg, progress):
        trained.append(cfg)
        return tmp_path / cfg.train.name

    monkeypatch.setattr(study, "_train", fake_train)
    monkeypatch.setattr(study, "_efficiency_row", lambda run, data, pred_dir, progress, cell: {**cell, "run": run})
    p, cell = study.EFFICIENCY["tiny"], {"init": "swinmm", "ratio": 0.1, "seed": 1}
    rows = study._efficiency_cell(p, tmp_path / "data.json", tmp_path, cell, ["finetune.pretrained=PRE"], protocol,
                                  False)
    assert all((c.finetune.label_ratio, c.seed) == (0.1, 1) for c in trained)
    if protocol == "nested":
        assert [(r.get("stage"), r["run"].name) for r in rows] == [(None, "finetune_swinmm_ratio010_seed1")]
        (only,) = trained
        assert only.finetune.pretrained == "PRE" and not only.model.multiview and only.finetune.unlabeled == ""
        return
    base, semi = trained
    assert [(r["stage"], r["run"].name) for r in rows] == [("base", "finetune_swinmm_ratio010_seed1_base"),
                                                           ("semi", "finetune_swinmm_ratio010_seed1_semi")]
    assert base.finetune.pretrained == "PRE" and base.finetune.unlabeled == "" and base.model.multiview
    assert semi.finetune.pretrained == str(tmp_path / base.train.name) and semi.finetune.unlabeled == "rest"
    assert semi.model == base.model


def test_semi_stage_trains_on_its_bases_cases_with_the_others_unlabelled(tmp_path):
    """The second stage's config (``finetune.unlabeled=rest``, same ratio and seed) gives it the base's
    labelled and validation cases, and as unlabelled exactly the other training cases, labels dropped."""
    from swinssl.data.discover import find_dataset
    from swinssl.data.phantom import write_phantom_dataset
    from swinssl.engine.finetune import FinetuneStage

    write_phantom_dataset(tmp_path / "data", cases=9, size=32, seed=0)
    data, p = tmp_path / "data" / "dataset.json", study.EFFICIENCY["tiny"]
    cell = {"init": "scratch", "ratio": 0.5, "seed": 3}
    base = study.efficiency_finetune_config(p["semi_finetune_config"], p, data, tmp_path, "base", cell, [])
    semi = study.efficiency_finetune_config(p["semi_finetune_config"], p, data, tmp_path, "semi", cell,
                                            study.semi_stage_start(tmp_path / "finetune_base"))
    semi.finetune.pretrained = ""  # the cases each stage uses; the start weights are not needed for that
    first, second = FinetuneStage(base), FinetuneStage(semi)

    def ids(cases):
        return {c.case_id for c in cases}

    assert ids(second.train_cases) == ids(first.train_cases) and ids(second.val_cases) == ids(first.val_cases)
    training = ids(find_dataset(data).split("training", "validation"))
    assert ids(second.unlabeled) == training - ids(first.train_cases) - ids(first.val_cases) and second.unlabeled
    assert all(c.label is None for c in second.unlabeled) and not first.unlabeled


def test_efficiency_table_mean_and_sample_std():
    rows = [{"init": "scratch", "ratio": 0.1, "seed": s, "dice": d, "hd95": h, "train_cases": 1}
            for s, d, h in [(0, 0.2, 10.0), (1, 0.4, 30.0)]]
    (cell,) = study.efficiency_table(rows)
    assert cell["dice"] == pytest.approx((0.3, 0.1414213562))  # sqrt(((0.1)^2 + (0.1)^2) / 1)
    assert cell["hd95"] == pytest.approx((20.0, 14.142135623))


def test_views_study_tests_every_view_of_both_models_and_resumes(tmp_path, monkeypatch):
    micro = {"cases": 4, "size": 32, "seeds": [0],
             "models": {"swinmm": "finetune/swinmm_tiny", "swinunetr": "finetune/tiny"}, "finetune": MICRO["finetune"]}
    monkeypatch.setitem(study.VIEWS, "micro", micro)
    calls = []
    real_predict = study.predict

    def spy(*args, **kwargs):
        calls.append(args[3].views)  # the PredictOptions
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(study, "predict", spy)
    report = study.run_views_study(out=tmp_path, preset="micro", progress=False)
    rows = read_results(tmp_path)["rows"]
    assert {(r["model"], r["view"]) for r in rows} == {
        (m, v) for m in ("swinmm", "swinunetr") for v in ("identity", "swap_xy", "swap_xz", "fused")}
    assert sorted(calls) == sorted(["identity", "swap_xy", "swap_xz", "fused"] * 2)
    text = report.read_text()
    assert text.count("| swinmm |") == 4 and "Fused minus the mean of the single views" in text
    assert (tmp_path / "dice_by_view.png").read_bytes()[:4] == b"\x89PNG"
    from swinssl.checkpoint import read_checkpoint

    plan = read_checkpoint(tmp_path / "finetune_swinmm_seed0" / "checkpoints" / "last.pt")["plan"]
    assert plan["network"]["multiview"] and plan["finetune_method"] == "swinmm"

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(study, "finetune", refuse)
    monkeypatch.setattr(study, "predict", refuse)
    study.run_views_study(out=tmp_path, preset="micro", progress=False)
    assert read_results(tmp_path)["rows"] == rows


def test_every_study_preset_gives_valid_configs():
    from swinssl.config import load_config

    for p in study.PRESETS.values():
        for config in p["methods"].values():
            load_config([config, p["pretrain"]], ["data=x"])
        load_config(["finetune/tiny", p["finetune"]], ["data=x"])
    for p in study.EFFICIENCY.values():
        load_config(["pretrain/swinmm", p["pretrain"]], ["data=x"])
        load_config([p["finetune_config"], p["finetune"]], ["data=x", "finetune.label_ratio=0.1"])
        semi = load_config([p["semi_finetune_config"], p["finetune"]], ["data=x", "finetune.unlabeled=rest"])
        assert semi.model.multiview  # pseudo-labels come from the two views
    for p in study.VIEWS.values():
        for config in p["models"].values():
            load_config([config, p["finetune"]], ["data=x"])
    tiny = load_config(["pretrain/swin_unetr_tiny", study.PRESETS["tiny"]["pretrain"]])
    assert tiny.model.depths == (1, 1, 1, 1) and tiny.train.steps == 60 and tiny.model.feature_size == 12


def test_case_dice_is_each_cases_mean_over_its_classes(tmp_path):
    (tmp_path / "metrics.csv").write_text("case_id,class,class_name,dice,hd95,nsd\n"
                                          "a,1,liver,0.8,1,1\na,2,kidney,0.4,1,1\nb,1,liver,0.5,1,1\nb,2,kidney,0.0,1,1\n")
    assert EvaluationFolder(tmp_path).case_dice() == pytest.approx({"a": 0.6, "b": 0.25})
