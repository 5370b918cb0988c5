"""``swinssl study benchmark``: pre-trained Swin vs the same network from scratch vs nnU-Net, on the
user's data, with the field's evaluation protocol (OpenMind, Spark3D, Touchstone).

Per dataset, label fraction and seed, every arm trains on the same cases and is tested on the same
held-out test cases:

- ``scratch``: swinssl fine-tuning of the network from a random start;
- one arm per pre-training (``--pretrained RUN``): the same fine-tuning from its weights;
- ``nnunet``: nnU-Net v2's own plans (3d_fullres), network and trainer (``swinssl.nnunet.arm``),
  trained on exactly the cases the swinssl fine-tunings trained and validated on (read from the
  scratch run's data manifest) and predicting the same test cases.

Every arm's masks are scored by ``swinssl.metrics.evaluate`` (Dice and NSD per case and class), so
one code path scores them all. A unit (dataset, fraction, seed, arm) is resumable: a finished one
is reused, a stopped training resumes from its last checkpoint.

Datasets are tagged ``dev`` or ``test`` (``--data test:PATH``). Choices (presets, steps, which arm to
recommend) are made on dev datasets only; test datasets are reported, never chosen on.
``choose_on_dev`` is the one place a choice is made, and it sees only dev rows.

Statistics (``swinssl.workflows.comparison``): per family (one dataset at one fraction), every pair of
arms is compared on paired per-case mean Dice (case x seed) by the verdict's bootstrap interval and
Wilcoxon test, with Holm's correction across the family's pairs; effect sizes (mean difference and
d_z) with intervals; mean ranks across datasets and fractions (ties averaged), dev and test apart;
a pairwise significance map per family; device-hours per arm, pre-training counted separately.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from swinssl.checkpoint import read_head
from swinssl.config import load_config
from swinssl.data.discover import find_dataset
from swinssl.data.phantom import write_phantom_dataset
from swinssl.engine.finetune import finetune
from swinssl.errors import ConfigError
from swinssl.metrics import evaluate, summarize
from swinssl.results import EvaluationFolder, write_results
from swinssl.runs import RunDir
from swinssl.utils import atomic_write_text
from swinssl.workflows.comparison import (Comparison, compare_arms, mean_ranks, plot_significance_map,
                                          rank_table_markdown, setting_ranks)
from swinssl.workflows.study import _evaluate, _preset, _train, pretraining_compute

TAGS = ("dev", "test")
SCRATCH, NNUNET = "scratch", "nnunet"

# Sizes are plain data, as the other studies': fine-tuning presets with an overlay, and nnU-Net's schedule.
BENCHMARK = {
    "tiny": {  # CPU: phantoms and small real volumes, tiny networks, nnU-Net for a few hundred iterations
        "cases": 12,  # phantoms written when no --data is given; 3 are test cases
        "size": 64,
        "fractions": [0.5, 1.0],
        "seeds": [0],
        "finetune_config": "finetune/tiny",
        "finetune": "study/tiny_finetune",  # 160 steps of batch 1 x 2 crops
        # nnU-Net's trainer with its schedule cut to 8 epochs x 20 iterations (batch 2): about the
        # swinssl arms' 160 steps x 2 crops, so neither side gets more passes over the data.
        "nnunet": {"epochs": 8, "iterations": 20},
    },
    "full": {  # a GPU and your datasets: nnU-Net's own schedule (1000 epochs x 250 iterations)
        "cases": 40,
        "size": 96,
        "fractions": [0.1, 0.25, 0.5, 1.0],
        "seeds": [0, 1, 2],
        "finetune_config": "finetune/ct",
        "finetune": "study/full_finetune",
        "nnunet": {"epochs": 1000, "iterations": 250},
    },
}


@dataclass(frozen=True)
class Dataset:
    """One ``--data``: its tag (dev or test), its name in the report and its path."""

    tag: str
    name: str
    path: Path


def parse_datasets(specs: Sequence[str], out: Path, preset: dict) -> list[Dataset]:
    """``--data`` values: ``PATH``, ``dev:PATH`` or ``test:PATH``; none: phantoms written into
    ``out/data`` (dev). Names are the datasets' folder names, made unique."""
    if not specs:
        data = out / "data" / "dataset.json"
        if not data.is_file():
            write_phantom_dataset(data.parent, cases=preset["cases"], size=preset["size"], seed=0)
        specs = [f"dev:{data}"]
    datasets, names = [], set()
    for spec in specs:
        tag, _, path = spec.partition(":") if spec.split(":", 1)[0] in TAGS else ("dev", "", spec)
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"--data {spec}: {path} does not exist")
        dataset = find_dataset(path)
        if not [c for c in dataset.split("test") if c.label is not None]:
            raise ConfigError(f"--data {spec}: no labelled test cases (every arm is tested on them)")
        name = (dataset.root.name if dataset.root.name not in ("", ".") else path.stem) or "data"
        while name in names:
            name += "_"
        names.add(name)
        datasets.append(Dataset(tag, name, path))
    return datasets


def parse_pretrained(specs: Sequence[str]) -> dict[str, Path]:
    """``--pretrained`` values: ``RUN`` or ``NAME=RUN``; the arm's name is NAME or the run folder's name."""
    arms: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        path = Path(path)
        name = name or path.name
        if not path.exists():
            raise ConfigError(f"--pretrained {spec}: {path} does not exist")
        if name in (SCRATCH, NNUNET) or name in arms:
            raise ConfigError(f"--pretrained {spec}: arm name {name!r} is taken; name it with NAME=RUN")
        arms[name] = path
    return arms


def run_benchmark_study(data: Sequence[str] = (), pretrained: Sequence[str] = (), out: str | Path = "runs/benchmark",
                        preset: str = "tiny", fractions: Sequence[float] | None = None,
                        seeds: Sequence[int] | None = None, nnunet: bool = True, progress: bool = True) -> Path:
    """Run (or finish) the benchmark into ``out``; returns its ``report.md`` (see the module docstring)."""
    p = _preset(BENCHMARK, preset)
    fractions, seeds = list(fractions or p["fractions"]), list(p["seeds"] if seeds is None else seeds)
    if not fractions or any(not 0 < f <= 1 for f in fractions) or not seeds:
        raise ConfigError(f"label fractions must be in (0, 1] and seeds non-empty, got {fractions}, {seeds}")
    out = Path(out)
    datasets, starts = parse_datasets(data, out, p), parse_pretrained(pretrained)
    arms = [SCRATCH, *starts, *([NNUNET] if nnunet else [])]
    rows = []
    for dataset in datasets:
        for fraction in fractions:
            for seed in seeds:
                for arm in arms:
                    unit = {"dataset": dataset.name, "tag": dataset.tag, "fraction": fraction, "seed": seed, "arm": arm}
                    rows.append(run_unit(p, dataset, unit, starts.get(arm), out, progress))
    results = benchmark_results(rows, arms, datasets, out)
    results["pretraining"] = {name: pretraining_compute(run) for name, run in starts.items() if _is_run(run)}
    results["viewer"] = viewer_layers(rows, datasets, out)
    results["setup"] = {"preset": preset, "fractions": fractions, "seeds": seeds, "arms": arms,
                        "datasets": [{"name": d.name, "tag": d.tag, "path": str(d.path)} for d in datasets],
                        "nnunet_schedule": p["nnunet"] if nnunet else None}
    write_results(out, "study benchmark", results)
    write_cases_csv(rows, out / "cases.csv")
    report = out / "report.md"
    atomic_write_text(report, benchmark_report(results, out))
    return report


def unit_name(unit: dict) -> str:
    return f"{unit['arm']}_frac{round(unit['fraction'] * 100):03d}_seed{unit['seed']}"


def run_unit(p: dict, dataset: Dataset, unit: dict, start: Path | None, out: Path, progress: bool) -> dict:
    """Train (or reuse) one unit's model, predict and evaluate the test cases; its result row."""
    folder, name = out / dataset.name, unit_name(unit)
    pred_dir = masks = folder / f"predictions_{name}"  # swinssl's arms: masks and their evaluation
    if unit["arm"] == NNUNET:
        scratch = folder / f"finetune_{unit_name({**unit, 'arm': SCRATCH})}"
        arm = folder / f"nnunet_{name}"
        device_s = _nnunet_unit(p, dataset, scratch, arm, pred_dir, progress)
        masks = arm / "predictions"
    else:
        cfg = load_config([p["finetune_config"], p["finetune"]],
                          [f"data={dataset.path}", f"train.out={folder}", f"train.name=finetune_{name}",
                           f"finetune.label_ratio={unit['fraction']}", f"seed={unit['seed']}",
                           # The user named the start: it is compared on this data even if it was
                           # pre-trained on another modality (the report says so).
                           *([f"finetune.pretrained={start}", "finetune.allow_modality_change=true"] if start else [])])
        run = _train(finetune, cfg, progress)
        _evaluate(run, dataset.path, pred_dir, progress)
        head = read_head(RunDir(run).last)
        device_s = (head.wall_s or 0.0) * (head.world_size or 1)
    scores = EvaluationFolder(pred_dir).read_scores() or []
    return {**unit, "predictions": str(masks.relative_to(out)), "evaluation": str(pred_dir.relative_to(out)),
            "device_hours": device_s / 3600,
            "case_dice": EvaluationFolder(pred_dir).case_dice(), "scores": scores}


def _nnunet_unit(p: dict, dataset: Dataset, scratch: Path, folder: Path, pred_dir: Path, progress: bool) -> float:
    """nnU-Net on the cases the scratch run of the same dataset, fraction and seed trained and validated on;
    its test predictions evaluated into ``pred_dir``; the training device-seconds."""
    from swinssl.nnunet.arm import run_nnunet_arm

    if EvaluationFolder(pred_dir).read_summary() is None:
        found = find_dataset(dataset.path)
        by_id = {c.case_id: c for c in found.cases}
        manifest = RunDir(scratch).read_manifest()  # the swinssl split itself, as that run used it
        train, validation = ([by_id[e["case_id"]] for e in manifest.get(split, [])] for split in ("train", "validation"))
        test = [c for c in found.split("test") if c.label is not None]
        masks = run_nnunet_arm(train, validation, test, folder, labels=found.labels,
                               channel_names=found.channel_names, progress=progress, **p["nnunet"])
        evaluate(masks, dataset.path, out_dir=pred_dir, split="test")
    arm = json.loads((folder / "arm.json").read_text())
    return float(arm.get("train_s", 0.0))


def _is_run(path: Path) -> bool:
    return RunDir(path).last.is_file()


def case_scores(rows: Sequence[dict], dataset: str, fraction: float) -> dict[str, dict[str, float]]:
    """``arm -> "case|seed" -> mean Dice`` of one family (a dataset at one fraction)."""
    scores: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["dataset"] == dataset and r["fraction"] == fraction:
            scores.setdefault(r["arm"], {}).update({f"{case}|{r['seed']}": d for case, d in r["case_dice"].items()})
    return scores


def family_name(tag: str, dataset: str, fraction: float) -> str:
    return f"{tag}:{dataset}@{fraction:g}"


def mean_dice_by_setting(rows: Sequence[dict], tag: str) -> dict[str, dict[str, float]]:
    """``"dataset@fraction" -> arm -> mean Dice`` over its cases and seeds, for the datasets tagged ``tag``."""
    settings: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        if r["tag"] == tag:
            settings.setdefault(f"{r['dataset']}@{r['fraction']:g}", {}).setdefault(r["arm"], []).extend(
                r["case_dice"].values())
    return {s: {arm: sum(v) / len(v) for arm, v in arms.items()} for s, arms in settings.items()}


def choose_on_dev(rows: Sequence[dict]) -> str | None:
    """The arm the study recommends: the best mean rank over the dev datasets' settings. Only dev rows
    are read: a test dataset never feeds a choice. None without dev datasets."""
    settings = mean_dice_by_setting(rows, "dev")
    return next(iter(mean_ranks(settings))) if settings else None


def benchmark_results(rows: Sequence[dict], arms: Sequence[str], datasets: Sequence[Dataset], out: Path) -> dict:
    """Every number of the study: per-unit rows (without the per-class scores, which go to cases.csv),
    comparisons with Holm's correction per family, mean ranks (dev, test), device-hours per arm, the maps."""
    comparisons: list[Comparison] = []
    maps = {}
    for dataset in datasets:
        for fraction in dict.fromkeys(r["fraction"] for r in rows if r["dataset"] == dataset.name):
            family = family_name(dataset.tag, dataset.name, fraction)
            found = compare_arms(case_scores(rows, dataset.name, fraction), family=family, dataset=dataset.name,
                                 fraction=fraction)
            comparisons += found
            png = out / f"significance_{dataset.tag}_{dataset.name}_{round(fraction * 100):03d}.png"
            plot_significance_map(found, arms, png, title=family)
            maps[family] = png.name
    ranks = {}
    for tag in TAGS:
        settings = mean_dice_by_setting(rows, tag)
        if settings:
            ranks[tag] = {"mean_rank": mean_ranks(settings), "mean_dice": settings}
    device_hours = {arm: sum(r["device_hours"] for r in rows if r["arm"] == arm) for arm in arms}
    return {"units": [{k: v for k, v in r.items() if k != "scores"} for r in rows],
            "comparisons": [c.to_dict() for c in comparisons], "ranks": ranks, "maps": maps,
            "device_hours": device_hours, "chosen_on_dev": choose_on_dev(rows)}


def write_cases_csv(rows: Sequence[dict], path: Path) -> None:
    """One row per (arm, dataset, fraction, seed, case, class): Dice and NSD as ``swinssl evaluate`` wrote them."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["arm", "dataset", "tag", "fraction", "seed", "case", "class", "class_name", "dice", "nsd"])
    for r in rows:
        for s in r["scores"]:
            writer.writerow([r["arm"], r["dataset"], r["tag"], f"{r['fraction']:g}", r["seed"], s["case_id"],
                             s["class"], s.get("class_name", ""), f"{s['dice']:.6g}", f"{s['nsd']:.6g}"])
    atomic_write_text(path, buffer.getvalue())


def viewer_layers(rows: Sequence[dict], datasets: Sequence[Dataset], out: Path) -> dict:
    """What the HTML report's 3D viewer shows: one test case (the first of the first test dataset, else of
    the first dataset) at the largest fraction and first seed, one layer per arm: its mask copied into
    ``out/viewer/<arm>/`` (a folder of masks the report pairs with the dataset's labels)."""
    dataset = next((d for d in datasets if d.tag == "test"), datasets[0])
    mine = [r for r in rows if r["dataset"] == dataset.name]
    fraction, seed = max(r["fraction"] for r in mine), min(r["seed"] for r in mine)
    chosen = [r for r in mine if r["fraction"] == fraction and r["seed"] == seed]
    case = sorted(chosen[0]["case_dice"])[0]
    folders = {}
    for r in chosen:
        mask = next((out / r["predictions"]).glob(f"{case}.*"), None)
        if mask is not None:
            target = out / "viewer" / r["arm"] / mask.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mask, target)
            # Its scores as evaluate wrote them, so the report shows them without scoring the folder again.
            scores = [row for row in r["scores"] if row["case_id"] == case]
            EvaluationFolder(target.parent).write(scores, {**summarize(scores), "labels": str(dataset.path)})
            folders[r["arm"]] = str(target.parent.relative_to(out))
    return {"labels": str(dataset.path), "case": case, "folders": folders}


def benchmark_report(results: dict, out: Path) -> str:
    """``report.md``: setup, mean Dice, rank tables (dev and test apart), corrected comparisons, maps,
    device-hours, and the choice made on dev."""
    setup = results["setup"]
    lines = ["# Benchmark study: pre-trained Swin vs scratch vs nnU-Net", "",
             f"Preset `{setup['preset']}`; label fractions {', '.join(f'{f:g}' for f in setup['fractions'])}; "
             f"seeds {', '.join(map(str, setup['seeds']))}; arms {', '.join(f'`{a}`' for a in setup['arms'])}.", ""]
    lines += ["| dataset | tag | path |", "| --- | --- | --- |"]
    lines += [f"| {d['name']} | {d['tag']} | `{d['path']}` |" for d in setup["datasets"]]
    lines += ["", "Choices (presets, steps, the arm recommended below) are made on `dev` datasets only; `test` "
              "datasets are reported and never chosen on. Every arm trains on the same cases of a dataset, fraction "
              "and seed, and is scored on the same held-out test cases by `swinssl evaluate` (Dice, NSD). A "
              "pre-trained arm is fine-tuned from its weights even where it was pre-trained on another modality "
              "than the dataset's (`finetune.allow_modality_change=true`).", ""]
    if setup.get("nnunet_schedule"):
        s = setup["nnunet_schedule"]
        lines += [f"`nnunet`: nnU-Net v2's own plans (3d_fullres), network and trainer, schedule {s['epochs']} epochs "
                  f"x {s['iterations']} iterations (nnU-Net's default: 1000 x 250), trained on the swinssl split's "
                  "training cases with its validation cases as fold 0's validation.", ""]
    lines += ["## Mean Dice (test cases x seeds)", "", "| dataset | fraction | " + " | ".join(setup["arms"]) + " |",
              "| --- | --- |" + " --- |" * len(setup["arms"])]
    for d in setup["datasets"]:
        for f in setup["fractions"]:
            means = results["ranks"].get(d["tag"], {}).get("mean_dice", {}).get(f"{d['name']}@{f:g}", {})
            cells = [f"{means[arm]:.3f}" if arm in means else "-" for arm in setup["arms"]]
            lines.append(f"| {d['name']} ({d['tag']}) | {f:g} | " + " | ".join(cells) + " |")
    for tag in TAGS:
        if tag in results["ranks"]:
            r = results["ranks"][tag]
            lines += ["", f"## Mean rank, {tag} datasets (1 = best; ties averaged)", "",
                      rank_table_markdown(r["mean_rank"], setting_ranks(r["mean_dice"]))]
    lines += ["", "## Pairwise comparisons", "",
              "Per family (one dataset at one fraction): paired per-case mean Dice over test cases x seeds; mean "
              "difference with its bootstrap 95% interval, effect size d_z (mean / sd of the differences) with its "
              "interval, two-sided Wilcoxon signed-rank p, and p after Holm's correction across the family's pairs.",
              "", "| family | first | second | n | mean diff (95% CI) | d_z (95% CI) | p | p (Holm) | verdict |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results["comparisons"]:
        verdict = {1: f"{c['first']} better", -1: f"{c['second']} better", 0: "no detectable difference"}[c["sign"]]
        # A resample of few pairs often has no d_z (comparison.py): then the interval is not given.
        effect_ci = ("no interval: too few pairs" if c["effect_low"] != c["effect_low"]
                     else f"{c['effect_low']:+.2f}..{c['effect_high']:+.2f}")
        lines.append(f"| {c['family']} | {c['first']} | {c['second']} | {c['n']} | {c['mean']:+.3f} "
                     f"({c['low']:+.3f}..{c['high']:+.3f}) | {c['effect']:+.2f} ({effect_ci}) "
                     f"| {c['p_value']:.2g} | {c['p_holm']:.2g} | {verdict} |")
    lines += ["", "Significance maps (row arm vs column arm, Holm-corrected): "
              + ", ".join(f"`{png}`" for png in results["maps"].values()), "",
              "## Compute", "", "| arm | training device-hours |", "| --- | --- |"]
    lines += [f"| {arm} | {h:.4f} |" for arm, h in results["device_hours"].items()]
    for name, c in results.get("pretraining", {}).items():
        lines.append(f"| pre-training `{name}` (counted apart) | {c['device_hours']:.4f} |")
    chosen = results["chosen_on_dev"]
    lines += ["", "## Chosen on dev", ""]
    if chosen is None:
        lines.append("No dev dataset: nothing is chosen (choices are made on dev datasets only).")
    else:
        lines.append(f"Best mean rank on the dev datasets: `{chosen}`.")
        if "test" in results["ranks"]:
            test_rank = results["ranks"]["test"]["mean_rank"]
            lines.append(f"On the test datasets it has mean rank {test_rank.get(chosen, float('nan')):.2f} "
                         f"(best there: `{next(iter(test_rank))}`).")
    lines += ["", f"Reproduce: `swinssl study benchmark --out {out}` with the same --data and --pretrained.", ""]
    return "\n".join(lines)

