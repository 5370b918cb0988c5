"""``swinssl study benchmark`` (``swinssl.workflows.benchmark``): every arm on one split, the nnU-Net arm fed
the swinssl split, resume after a kill, dev and test kept apart, and the files it writes.

The nnU-Net arm itself (nnU-Net's own commands and the files they write) is tested in
tests/test_nnunet_arm.py; here it is replaced by a stand-in that records what it was given.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest

from swinssl.data.discover import find_dataset
from swinssl.data.phantom import write_phantom_dataset
from swinssl.errors import ConfigError
from swinssl.runs import RunDir
from swinssl.workflows import benchmark

OVERLAY = """\
preprocess: {roi_size: [32, 32, 32], num_crops: 1}
model: {depths: [1, 1, 1, 1]}
train: {steps: 2, val_every: 2, checkpoint_every: 2, log_every: 1, warmup_steps: 1, num_workers: 0, preview_every: 0}
"""


@pytest.fixture
def preset(tmp_path, monkeypatch):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(OVERLAY)
    monkeypatch.setitem(benchmark.BENCHMARK, "test", {
        "cases": 8, "size": 32, "fractions": [1.0], "seeds": [0], "finetune_config": "finetune/tiny",
        "finetune": str(overlay), "nnunet": {"epochs": 1, "iterations": 1}})
    return "test"


@pytest.fixture
def datasets(tmp_path):
    dev = write_phantom_dataset(tmp_path / "dev", cases=8, size=32, seed=1)
    test = write_phantom_dataset(tmp_path / "held", cases=6, size=32, seed=2, test_fraction=0.5)
    return [f"dev:{dev / 'dataset.json' if dev.is_dir() else dev}",
            f"test:{test / 'dataset.json' if test.is_dir() else test}"]


class StandInArm:
    """Records the cases it is given and writes each test case's label as its mask (a perfect arm)."""

    def __init__(self):
        self.calls = []

    def __call__(self, train, validation, test, out, labels, channel_names, progress=True, epochs=None,
                 iterations=None):
        self.calls.append({"out": Path(out), "train": sorted(c.case_id for c in train),
                           "validation": sorted(c.case_id for c in validation),
                           "test": sorted(c.case_id for c in test), "epochs": epochs})
        masks = Path(out) / "predictions"
        masks.mkdir(parents=True, exist_ok=True)
        for case in test:
            shutil.copyfile(case.label, masks / f"{case.case_id}.nii.gz")
        (Path(out) / "arm.json").write_text(json.dumps({"train_s": 36.0}))
        return masks


@pytest.fixture
def arm(monkeypatch):
    import swinssl.nnunet.arm

    stand_in = StandInArm()
    monkeypatch.setattr(swinssl.nnunet.arm, "run_nnunet_arm", stand_in)
    return stand_in


def test_every_arm_trains_on_one_split_and_the_outputs_hold_every_number(tmp_path, preset, datasets, arm,
                                                                         monkeypatch):
    trained = []
    real = benchmark.finetune

    def counting(*args, **kwargs):
        trained.append(kwargs.get("resume") or args[0].train.name)
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark, "finetune", counting)
    out = tmp_path / "study"
    report = benchmark.run_benchmark_study(datasets, [], out, preset=preset, progress=False)

    assert len(trained) == 2  # scratch on each dataset
    # The nnU-Net arm got exactly the cases the scratch run trained and validated on, and the test cases.
    assert len(arm.calls) == 2
    for call, data in zip(arm.calls, datasets):
        dataset = find_dataset(data.split(":", 1)[1])
        name = Path(call["out"]).parent.name
        manifest = RunDir(out / name / "finetune_scratch_frac100_seed0").read_manifest()
        assert call["train"] == sorted(e["case_id"] for e in manifest["train"])
        assert call["validation"] == sorted(e["case_id"] for e in manifest["validation"])
        assert call["test"] == sorted(c.case_id for c in dataset.split("test")) and call["train"]
        assert not set(call["test"]) & set(call["train"] + call["validation"])
        assert call["epochs"] == 1  # the preset's schedule

    results = json.loads((out / "results.json").read_text())
    assert results["kind"] == "study benchmark"
    assert {(u["dataset"], u["tag"], u["arm"]) for u in results["units"]} == {
        ("dev", "dev", "scratch"), ("dev", "dev", "nnunet"), ("held", "test", "scratch"), ("held", "test", "nnunet")}
    nnunet_units = [u for u in results["units"] if u["arm"] == "nnunet"]
    assert all(set(u["case_dice"].values()) == {1.0} for u in nnunet_units)  # its masks were scored: perfect
    assert results["device_hours"]["nnunet"] == pytest.approx(2 * 36.0 / 3600)
    assert results["device_hours"]["scratch"] > 0
    families = {c["family"] for c in results["comparisons"]}
    assert families == {"dev:dev@1", "test:held@1"}
    for family, png in results["maps"].items():
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert set(results["ranks"]) == {"dev", "test"}
    assert results["ranks"]["dev"]["mean_rank"] == {"nnunet": 1.0, "scratch": 2.0}
    scratch_dev = next(u for u in results["units"] if u["arm"] == "scratch" and u["dataset"] == "dev")["case_dice"]
    assert len(scratch_dev) > 1 and results["ranks"]["dev"]["mean_dice"]["dev@1"] == {
        "scratch": pytest.approx(sum(scratch_dev.values()) / len(scratch_dev)), "nnunet": 1.0}
    assert results["chosen_on_dev"] == "nnunet"

    with open(out / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["arm"] for r in rows} == {"scratch", "nnunet"}
    units = {(r["arm"], r["dataset"], r["case"]) for r in rows}
    assert units == {(u["arm"], u["dataset"], case) for u in results["units"] for case in u["case_dice"]}
    assert all(r["dice"] == "1" and r["nsd"] == "1" for r in rows if r["arm"] == "nnunet")
    text = report.read_text()
    assert "dev" in text and "never chosen on" in text and "Holm" in text
    assert not re.search(r"[+-]nan\b", text)  # an interval that does not exist is said in words
    for u in results["units"]:  # each mean Dice of the report's table: over the unit's test cases
        if u["arm"] == "scratch":
            mean = sum(u["case_dice"].values()) / len(u["case_dice"])
            assert f"| {u['dataset']} ({u['tag']}) | 1 | {mean:.3f} | 1.000 |" in text
    assert any(c["effect_low"] != c["effect_low"] for c in results["comparisons"]) == ("too few pairs" in text)
    # One test case per arm for the 3D viewer, from the test dataset.
    viewer = results["viewer"]
    assert set(viewer["folders"]) == {"scratch", "nnunet"} and "held" in viewer["labels"]
    for arm_name, folder in viewer["folders"].items():
        assert [m.name for m in (out / folder).glob("*.nii.gz")] == [f"{viewer['case']}.nii.gz"]
        unit = next(u for u in results["units"] if u["arm"] == arm_name and u["dataset"] == "held")
        assert benchmark.EvaluationFolder(out / folder).case_dice() == {viewer["case"]: unit["case_dice"][viewer["case"]]}

    # swinssl report: the answer, the rank tables and the comparisons, and one case per arm in the viewer.
    from swinssl.report.collect import collect

    page = collect(out)
    assert page.kind == "study" and "Best mean rank on the dev datasets: nnunet." in page.summary
    tables = {t.title.split(" (")[0]: t for t in page.tables}
    dev_ranks = next(t for title, t in tables.items() if title.startswith("Mean rank on the dev"))
    assert [row[:2] for row in dev_ranks.rows] == [["nnunet", 1.0], ["scratch", 2.0]]
    assert len(tables["Pairwise comparisons, paired per case and seed"].rows) == 2
    assert [c.case_id for c in page.cases] == [viewer["case"]]
    assert [layer.name for layer in page.cases[0].layers] == ["label", "scratch", "nnunet"]
    assert all(layer.path is not None for layer in page.cases[0].layers) and not page.notes

    # Run again: every unit is reused, nothing trains, nnU-Net is not called, the same numbers come out.
    trained.clear()
    arm.calls.clear()
    benchmark.run_benchmark_study(datasets, [], out, preset=preset, progress=False)
    assert trained == [] and arm.calls == []
    again = json.loads((out / "results.json").read_text())
    assert again["units"] == results["units"] and again["comparisons"] == results["comparisons"]


def test_a_killed_study_resumes_without_redoing_finished_units(tmp_path, preset, datasets, arm, monkeypatch):
    out = tmp_path / "study"
    done = []
    real_unit = benchmark.run_unit

    def killed_at_the_third(p, dataset, unit, start, out_, progress):
        if len(done) == 2:
            raise KeyboardInterrupt  # as a kill between units
        done.append(benchmark.unit_name(unit))
        return real_unit(p, dataset, unit, start, out_, progress)

    monkeypatch.setattr(benchmark, "run_unit", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_benchmark_study(datasets, [], out, preset=preset, progress=False)
    assert len(arm.calls) == 1  # dev's scratch and nnunet finished
    monkeypatch.setattr(benchmark, "run_unit", real_unit)
    trained = []
    real = benchmark.finetune
    monkeypatch.setattr(benchmark, "finetune", lambda *a, **k: trained.append(a[0].train.out) or real(*a, **k))
    benchmark.run_benchmark_study(datasets, [], out, preset=preset, progress=False)
    assert [Path(t).name for t in trained] == ["held"]  # only the unfinished dataset's scratch arm trained
    assert len(arm.calls) == 2 and Path(arm.calls[1]["out"]).parent.name == "held"


def test_a_pretrained_arm_differs_from_scratch_only_in_its_start(tmp_path, preset, datasets, monkeypatch):
    configs = []

    def fake_train(stage, cfg, progress):
        configs.append(cfg)
        return Path(cfg.train.out) / cfg.train.name

    monkeypatch.setattr(benchmark, "_train", fake_train)
    monkeypatch.setattr(benchmark, "_evaluate", lambda *a, **k: None)
    monkeypatch.setattr(benchmark, "read_head", lambda path: type("H", (), {"wall_s": 1.0, "world_size": 1})())
    monkeypatch.setattr(benchmark.EvaluationFolder, "read_scores", lambda self: [])
    monkeypatch.setattr(benchmark.EvaluationFolder, "case_dice", lambda self: {"a": 0.5})
    run = tmp_path / "pre_run"
    run.mkdir()
    unit = {"dataset": "dev", "tag": "dev", "fraction": 0.5, "seed": 3}
    dataset = benchmark.parse_datasets(datasets[:1], tmp_path, benchmark.BENCHMARK[preset])[0]
    for arm_name, start in (("scratch", None), ("pre", run)):
        benchmark.run_unit(benchmark.BENCHMARK[preset], dataset, {**unit, "arm": arm_name}, start, tmp_path, False)
    scratch, pre = configs
    assert pre.finetune.pretrained == str(run) and not scratch.finetune.pretrained
    assert pre.finetune.allow_modality_change and not scratch.finetune.allow_modality_change  # the user named it
    assert (pre.finetune.label_ratio, pre.seed, pre.data.path) == (scratch.finetune.label_ratio, scratch.seed,
                                                                    scratch.data.path) == (0.5, 3, scratch.data.path)
    assert pre.train.steps == scratch.train.steps == 2


def rows_of(tag: str, dataset: str, scores: dict[str, float]) -> list[dict]:
    return [{"tag": tag, "dataset": dataset, "fraction": 1.0, "seed": 0, "arm": arm, "case_dice": {"c": d}}
            for arm, d in scores.items()]


def test_a_dataset_tagged_test_never_feeds_the_choice():
    dev = rows_of("dev", "d1", {"a": 0.8, "b": 0.7})
    test = [r for i in range(3) for r in rows_of("test", f"t{i}", {"a": 0.1, "b": 0.9})]
    assert benchmark.choose_on_dev(dev + test) == "a"  # test says b, three times over
    assert benchmark.choose_on_dev(test) is None
    flipped = [{**r, "case_dice": {"c": 1 - r["case_dice"]["c"]}} for r in test]
    assert benchmark.choose_on_dev(dev + flipped) == benchmark.choose_on_dev(dev)


def test_data_and_pretrained_arguments_are_checked(tmp_path, datasets):
    p = {"cases": 4, "size": 32}
    assert [(d.tag, d.name) for d in benchmark.parse_datasets(datasets, tmp_path, p)] == [("dev", "dev"),
                                                                                          ("test", "held")]
    plain = datasets[0].split(":", 1)[1]
    assert benchmark.parse_datasets([plain, plain], tmp_path, p)[1].name == "dev_"  # names kept apart
    with pytest.raises(ConfigError, match="does not exist"):
        benchmark.parse_datasets([f"test:{tmp_path / 'nowhere'}"], tmp_path, p)
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    assert benchmark.parse_pretrained([str(run), f"other={run}"]) == {"mine": run, "other": run}
    with pytest.raises(ConfigError, match="taken"):
        benchmark.parse_pretrained([f"nnunet={run}"])
    with pytest.raises(ConfigError, match="taken"):
        benchmark.parse_pretrained([str(run), str(run)])
