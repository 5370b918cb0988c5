"""Studies that check the papers' claims on small data, one command each (``swinssl study ...``).

``data-efficiency``: the label-efficiency claim (Swin UNETR Fig. 7, SwinMM Table 5). Pre-train
once (the method of a pre-training config), then fine-tune from those weights and from scratch
on seeded, nested subsets of the labelled cases (label ratios x seeds) and test every model on
the same held-out test cases: mean +- std Dice and HD95 per ratio and init, and a plot. Protocol
``semi`` (SwinMM Table 5, sec. 3.2 "Data efficiency"): each such fine-tuning is a base model
(stage ``base``, multi-view, labelled cases only), then training continues from it with the
training cases it left out added unlabelled, pseudo-labelled by the views (stage ``semi``,
``finetune.unlabeled=rest``); both stages are tested.

``views``: the multi-view claim (SwinMM Table 3). Fine-tune a SwinMM multi-view model and a
plain SwinUNETR on the same cases, then test each through every single axis order and fused
(the softmax of the three orders averaged; for the plain model, an ensemble of permuted
inputs, the tables' "Fuse" row).

``modality``: the out-of-modality comparison of SwinFUSE (Table 2). Pre-train each method on
the same mixed CT + MRI training volumes, fine-tune from each pre-training (and from scratch)
on CT and, separately, on MRI, then evaluate every model on the held-out test cases of both
modalities. On the paired phantoms the two modalities share one anatomy and one label map,
so "trained on CT, tested on MRI" isolates the modality shift.

Every stage writes its own run directory under ``out``; a finished stage is reused when the
study runs again (so an interrupted study resumes), an unfinished training stage resumes from
its last checkpoint. Sizes are plain data (``PRESETS``, ``EFFICIENCY``, ``VIEWS``) naming overlay
presets in ``configs/study/``.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

from swinssl.checkpoint import read_head
from swinssl.config import Config, load_config
from swinssl.data.discover import find_dataset
from swinssl.data.phantom import write_phantom_dataset
from swinssl.data.splits import REST
from swinssl.engine.finetune import finetune
from swinssl.engine.pretrain import pretrain
from swinssl.errors import ConfigError
from swinssl.infer import PredictOptions, predict
from swinssl.metrics import evaluate
from swinssl.plots import save_lines
from swinssl.results import EvaluationFolder, write_results
from swinssl.runs import RunDir
from swinssl.utils import atomic_write_text
from swinssl.workflows.verdict import paired_verdict

# Sizes are plain data: phantom counts, and overlay presets (configs/study/) laid over the
# methods' and fine-tuning's own presets.
PRESETS = {
    "tiny": {  # about 20 minutes on 2 CPU cores
        "cases": 8,  # phantoms; 2 are test cases
        "size": 64,
        "methods": {"swin_unetr": "pretrain/swin_unetr_tiny", "swinfuse": "pretrain/swinfuse_tiny"},
        "pretrain": "study/tiny_pretrain",
        "finetune": "study/tiny_finetune",  # over finetune/tiny
    },
    "full": {  # a GPU: paper-size pre-trainings (their presets) on 40 paired phantoms of 96^3
        "cases": 40,
        "size": 96,
        "methods": {"swin_unetr": "pretrain/swin_unetr", "swinfuse": "pretrain/swinfuse"},
        "pretrain": "study/full_pretrain",
        "finetune": "study/modality_full_finetune",
    },
}
MODALITIES = {"CT": "dataset.json", "MRI": "dataset_mri.json"}

EFFICIENCY = {
    # About 32 minutes on 2 CPU cores (measured): 1 pre-training + 8 fine-tunings; each further
    # seed adds about 28. 60 fine-tuning steps gave Dice 0 in every cell; 160 learn the liver.
    # Protocol semi: 16 fine-tunings, each with two views: several times that (not measured at this size).
    "tiny": {
        "cases": 12,  # phantoms; 3 are test cases, 2 of the other 9 validate the fine-tunings
        "size": 64,
        "ratios": [0.1, 0.3, 0.5, 1.0],
        "seeds": [0],
        "pretrain": "study/efficiency_tiny_pretrain",
        "finetune_config": "finetune/tiny",
        "semi_finetune_config": "finetune/swinmm_tiny",  # protocol semi: pseudo-labels need two views
        "finetune": "study/tiny_finetune",
    },
    "full": {  # a GPU: paper-size networks, your dataset (data=...) with labelled test cases
        "cases": 40,
        "size": 96,
        "ratios": [0.1, 0.3, 0.5, 1.0],
        "seeds": [0, 1, 2],
        "pretrain": "study/full_pretrain",
        "finetune_config": "finetune/ct",
        "semi_finetune_config": "finetune/swinmm",
        "finetune": "study/full_finetune",
    },
}
# How the label ratios are used: nested (fine-tune on the labelled share) or semi (SwinMM Table 5:
# a base model on the labelled share, then continued with the rest pseudo-labelled).
PROTOCOLS = ("nested", "semi")


def run_modality_study(out: str | Path = "runs/study_modality", preset: str = "tiny", progress: bool = True) -> Path:
    """Run (or finish) the out-of-modality study into ``out``; returns its ``report.md``."""
    p = _preset(PRESETS, preset)
    out = Path(out)
    data = out / "data"
    if not (data / MODALITIES["MRI"]).is_file():
        write_phantom_dataset(data, cases=p["cases"], size=p["size"], seed=0)
    inits: dict[str, Path | None] = {"scratch": None}
    for method, config in p["methods"].items():
        # Both modalities' training images (imagesTr), never the test cases (imagesTs).
        cfg = load_config([config, p["pretrain"]], [f"data={data / 'imagesTr'}", f"train.out={out}",
                                                    f"train.name=pretrain_{method}"])
        inits[method] = _train(pretrain, cfg, progress)
    rows = []
    for init, pre_run in inits.items():
        for train_mod, dataset in MODALITIES.items():
            extra = [f"finetune.pretrained={pre_run}"] if pre_run else []
            cfg = load_config(["finetune/tiny", p["finetune"]], [f"data={data / dataset}", f"train.out={out}",
                                                                 f"train.name=finetune_{init}_{train_mod}", *extra])
            run = _train(finetune, cfg, progress)
            for test_mod, test_dataset in MODALITIES.items():
                summary = _evaluate(run, data / test_dataset, out / f"predictions_{init}_{train_mod}_on_{test_mod}",
                                    progress)
                rows.append({"init": init, "trained_on": train_mod, "tested_on": test_mod,
                             "dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"],
                             "dice_by_class": {c["name"]: c["dice"]["mean"] for c in summary["classes"].values()}})
    write_results(out, "study modality", {"rows": rows})
    report = out / "report.md"
    atomic_write_text(report, modality_report(rows, p, out))
    return report


VIEWS = {
    "tiny": {  # about 20 minutes on 2 CPU cores
        "cases": 10,  # phantoms; 2 are test cases
        "size": 64,
        "seeds": [0],
        "models": {"swinmm": "finetune/swinmm_tiny", "swinunetr": "finetune/tiny"},
        "finetune": "study/tiny_finetune",
    },
    "full": {  # a GPU, your dataset
        "cases": 40,
        "size": 96,
        "seeds": [0, 1, 2],
        "models": {"swinmm": "finetune/swinmm", "swinunetr": "finetune/ct"},
        "finetune": "study/full_finetune",
    },
}
VIEW_SETTINGS = ("identity", "swap_xy", "swap_xz", "fused")


def run_views_study(data: str | Path | None = None, out: str | Path = "runs/study_views", preset: str = "tiny",
                    seeds: list[int] | None = None, pretrained: str | Path = "", progress: bool = True) -> Path:
    """Run (or finish) the single-view vs fused study into ``out``; returns its ``report.md``.

    ``pretrained``: start both models from these weights (default: scratch).
    """
    p = _preset(VIEWS, preset)
    seeds = seeds if seeds is not None else p["seeds"]
    out = Path(out)
    data = _study_data(data, out, p)
    extra = [f"finetune.pretrained={pretrained}"] if pretrained else []
    rows = []
    for model, config in p["models"].items():
        for seed in seeds:
            cfg = load_config([config, p["finetune"]], [f"data={data}", f"train.out={out}",
                                                        f"train.name=finetune_{model}_seed{seed}", f"seed={seed}", *extra])
            run = _train(finetune, cfg, progress)
            for view in VIEW_SETTINGS:
                summary = _evaluate(run, data, out / f"predictions_{model}_seed{seed}_{view}", progress, view)
                rows.append({"model": model, "seed": seed, "view": view, "dice": summary["mean"]["dice"],
                             "hd95": summary["mean"]["hd95"]})
    write_results(out, "study views", {"rows": rows})
    save_lines(out / "dice_by_view.png", seed_table(rows, "model", "view"), "model", "view", "view", "test mean Dice")
    report = out / "report.md"
    atomic_write_text(report, views_report(rows, data, out))
    return report


def views_report(rows: list[dict], data: str | Path, out: Path) -> str:
    lines = [
        "# Single-view vs fused prediction",
        "",
        f"Both models fine-tuned on the same cases of `{data}`, tested on its held-out test cases through each axis "
        "order (identity, swap_xy, swap_xz) and fused (the softmax of the three averaged). Mean Dice over the "
        "foreground classes, HD95 in mm; mean +- std over seeds.",
        "",
        "| model | view | Dice | HD95 | seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for t in seed_table(rows, "model", "view"):
        lines.append(f"| {t['model']} | {t['view']} | {t['dice'][0]:.3f} +- {t['dice'][1]:.3f} | "
                     f"{t['hd95'][0]:.1f} +- {t['hd95'][1]:.1f} | {t['seeds']} |")
    lines += ["", "Fused minus the mean of the single views, mean Dice:", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        single = [r["dice"] for r in rows if r["model"] == model and r["view"] != "fused"]
        fused = [r["dice"] for r in rows if r["model"] == model and r["view"] == "fused"]
        lines.append(f"- {model}: {sum(fused) / len(fused) - sum(single) / len(single):+.3f}")
    lines += ["", f"Plot: `dice_by_view.png`. Reproduce: `swinssl study views --out {out}`", ""]
    return "\n".join(lines)


def _study_data(data: str | Path | None, out: Path, p: dict) -> Path:
    """The study's dataset: ``data``, or phantoms written once into ``out/data``; it must have test cases."""
    if data is None:
        data = out / "data" / "dataset.json"
        if not data.is_file():
            write_phantom_dataset(data.parent, cases=p["cases"], size=p["size"], seed=0)
    if not find_dataset(data).split("test"):
        raise ConfigError(f"{data}: no test cases to evaluate on (the study needs a labelled test split)")
    return Path(data)


def run_data_efficiency_study(config: str | Path = "pretrain/swin_unetr_tiny", data: str | Path | None = None,
                              out: str | Path = "runs/study_data_efficiency", preset: str = "tiny",
                              ratios: list[float] | None = None, seeds: list[int] | None = None,
                              protocol: str = "nested", progress: bool = True) -> Path:
    """Run (or finish) the data-efficiency study into ``out``; returns its ``report.md``.

    ``data``: a labelled dataset whose test cases have labels (default: phantoms written into
    ``out/data``). ``config``: the pre-training preset or YAML (its method is the one studied).
    ``protocol``: ``nested`` (one fine-tuning per cell) or ``semi`` (a base and a pseudo-labelled
    stage per cell, SwinMM Table 5; see the module docstring).
    """
    p = _preset(EFFICIENCY, preset)
    ratios, seeds = ratios or p["ratios"], seeds if seeds is not None else p["seeds"]
    if not ratios or any(not 0 < r <= 1 for r in ratios) or not seeds:
        raise ConfigError(f"label ratios must be in (0, 1] and seeds non-empty, got ratios {ratios}, seeds {seeds}")
    if protocol not in PROTOCOLS:
        raise ConfigError(f"--protocol {protocol!r}: choose one of {', '.join(map(repr, PROTOCOLS))}")
    out = Path(out)
    data = _study_data(data, out, p)
    cfg = load_config([config, p["pretrain"]], [f"data={data}", f"train.out={out}", "train.name=pretrain"])
    method, pre_run = cfg.method.name, _train(pretrain, cfg, progress)
    rows = []
    for ratio in ratios:
        for seed in seeds:
            for init in ("scratch", method):
                start = [f"finetune.pretrained={pre_run}"] if init == method else []
                rows += _efficiency_cell(p, data, out, {"init": init, "ratio": ratio, "seed": seed}, start, protocol,
                                         progress)
    compute = pretraining_compute(pre_run)
    verdicts = efficiency_verdicts(final_rows(rows), method)
    results = {"protocol": protocol, "runs": rows, "verdicts": verdicts, "pretraining": compute}
    if protocol == "semi":
        results["stage_verdicts"] = stage_verdicts(rows)
    write_results(out, "study data-efficiency", results)
    plot_efficiency(rows, out / "dice_vs_label_ratio.png")
    report = out / "report.md"
    atomic_write_text(report, efficiency_report(rows, method, data, out, verdicts, compute,
                                                results.get("stage_verdicts")))
    return report


def _efficiency_cell(p: dict, data: Path, out: Path, cell: dict, start: list[str], protocol: str,
                     progress: bool) -> list[dict]:
    """The result rows of one (init, ratio, seed) ``cell`` starting from ``start``: one fine-tuning
    (``nested``), or a base model and its semi stage (``semi``)."""
    name = f"{cell['init']}_ratio{round(cell['ratio'] * 100):03d}_seed{cell['seed']}"
    if protocol == "nested":
        run = _train(finetune, efficiency_finetune_config(p["finetune_config"], p, data, out, name, cell, start),
                     progress)
        return [_efficiency_row(run, data, out / f"predictions_{name}", progress, cell)]
    multiview = p["semi_finetune_config"]
    base = _train(finetune, efficiency_finetune_config(multiview, p, data, out, f"{name}_base", cell, start), progress)
    semi = _train(finetune, efficiency_finetune_config(multiview, p, data, out, f"{name}_semi", cell,
                                                       semi_stage_start(base)), progress)
    return [_efficiency_row(run, data, out / f"predictions_{name}_{stage}", progress, {**cell, "stage": stage})
            for stage, run in (("base", base), ("semi", semi))]


def efficiency_finetune_config(preset: str, p: dict, data: Path, out: Path, name: str, cell: dict,
                               start: list[str]) -> Config:
    """The fine-tuning ``preset`` of one study ``cell`` under the study preset ``p``'s overlay: on the
    seeded share ``cell["ratio"]`` of the labelled cases, seed ``cell["seed"]``, in ``out/finetune_<name>``;
    ``start``: overrides saying where it starts (and what else it adds)."""
    return load_config([preset, p["finetune"]],
                       [f"data={data}", f"train.out={out}", f"train.name=finetune_{name}",
                        f"finetune.label_ratio={cell['ratio']}", f"seed={cell['seed']}", *start])


def semi_stage_start(base: Path) -> list[str]:
    """Overrides of the semi-supervised stage (SwinMM Table 5): it continues from the ``base``
    model's weights (its last checkpoint), with the same labelled cases (same ratio and seed) and
    the training cases they leave out added unlabelled (``finetune.unlabeled=rest``: labels dropped,
    never read; the validation cases stay out)."""
    return [f"finetune.pretrained={base}", f"finetune.unlabeled={REST}"]


def _efficiency_row(run: Path, data: Path, pred_dir: Path, progress: bool, cell: dict) -> dict:
    """One result row: the ``cell``'s settings, its test mean Dice and HD95, per-case Dice and case counts."""
    summary = _evaluate(run, data, pred_dir, progress)
    row = {**cell, "dice": summary["mean"]["dice"], "hd95": summary["mean"]["hd95"],
           "train_cases": _manifest_count(run, "train"), "case_dice": EvaluationFolder(pred_dir).case_dice()}
    if "stage" in cell:
        row["unlabeled_cases"] = _manifest_count(run, "unlabeled")
    return row


def final_rows(rows: list[dict]) -> list[dict]:
    """The rows of the models a protocol ends with: all of ``nested``; the ``semi`` stage of ``semi``."""
    return [r for r in rows if r.get("stage", "semi") == "semi"]


def _paired_case_dice(rows: list[dict], key: str, first: str, second: str) -> tuple[list[float], list[float]]:
    """Per-case Dice of the rows whose ``key`` is ``first``, each paired with the row whose ``key`` is
    ``second`` and every other setting (seed, init, stage) the same, over the test cases both were tested on."""
    a, b = [], []
    others = [k for k in ("seed", "init", "stage") if k != key]
    for row in (r for r in rows if r[key] == first):
        for match in (r for r in rows if r[key] == second and all(r.get(k) == row.get(k) for k in others)):
            for case in sorted(set(row["case_dice"]) & set(match["case_dice"])):
                a.append(row["case_dice"][case])
                b.append(match["case_dice"][case])
    return a, b


def efficiency_verdicts(rows: list[dict], method: str) -> dict[str, dict]:
    """Per label ratio, the paired verdict (``swinssl.workflows.verdict``) of ``method`` against scratch over
    every (seed, test case) that both were tested on."""
    verdicts = {}
    for ratio in sorted({r["ratio"] for r in rows}):
        pre, scratch = _paired_case_dice([r for r in rows if r["ratio"] == ratio], "init", method, "scratch")
        if pre:
            verdicts[f"{ratio:g}"] = paired_verdict(pre, scratch).to_dict()
    return verdicts


def stage_verdicts(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Protocol ``semi``: per label ratio and init, the paired verdict of the semi stage against its
    base over every (seed, test case)."""
    verdicts: dict[str, dict[str, dict]] = {}
    for ratio in sorted({r["ratio"] for r in rows}):
        for init in dict.fromkeys(r["init"] for r in rows):
            cell = [r for r in rows if r["ratio"] == ratio and r["init"] == init]
            semi, base = _paired_case_dice(cell, "stage", "semi", "base")
            if semi:
                verdict = paired_verdict(semi, base, subject="the semi stage")
                verdicts.setdefault(f"{ratio:g}", {})[init] = verdict.to_dict()
    return verdicts


def pretraining_compute(run: Path) -> dict:
    """What a pre-training run cost: wall hours and device-hours (wall time x processes)."""
    ckpt = read_head(RunDir(run).last)
    wall, devices = float("nan") if ckpt.wall_s is None else ckpt.wall_s, ckpt.world_size
    return {"wall_hours": wall / 3600, "devices": devices, "device_hours": wall * devices / 3600}


def _preset(presets: dict, name: str) -> dict:
    if name not in presets:
        raise ConfigError(f"study preset {name!r}: choose one of {', '.join(map(repr, presets))}")
    return presets[name]


def _manifest_count(run: Path, split: str) -> int:
    """How many cases a run's data manifest lists in ``split`` (train, validation, unlabeled)."""
    manifest = RunDir(run).read_manifest()
    return len(manifest.get(split, []))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    m = sum(values) / len(values)
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return m, var**0.5


def seed_table(rows: list[dict], *keys: str) -> list[dict]:
    """One row per combination of the ``keys``' values that rows have (a key a row lacks counts as
    None), in order of first appearance: mean +- std over seeds of Dice and HD95, the number of
    seeds, and the ``cell``'s result rows."""
    table = []
    for values in itertools.product(*(dict.fromkeys(r.get(k) for r in rows) for k in keys)):
        cell = [r for r in rows if all(r.get(k) == v for k, v in zip(keys, values))]
        if cell:
            table.append({**dict(zip(keys, values)), "dice": mean_std([r["dice"] for r in cell]),
                          "hd95": mean_std([r["hd95"] for r in cell]), "seeds": len(cell), "cell": cell})
    return table


def efficiency_table(rows: list[dict]) -> list[dict]:
    """One row per (ratio, init, stage), ratios ascending: ``seed_table`` plus the training-case
    counts used (labelled, and unlabelled for the semi protocol's stages)."""
    table = sorted(seed_table(rows, "ratio", "init", "stage"), key=lambda t: t["ratio"])  # stable: inits keep order
    for t in table:
        cell = t.pop("cell")
        t["train_cases"] = sorted({r["train_cases"] for r in cell})
        t["unlabeled_cases"] = sorted({r.get("unlabeled_cases", 0) for r in cell})
    return table


def efficiency_report(rows: list[dict], method: str, data: str | Path, out: Path, verdicts: dict | None = None,
                      compute: dict | None = None, stage_verdicts: dict | None = None) -> str:
    """The study's ``report.md``: its table, gains and verdict lines; a stage column and the semi
    stage's gains and verdicts when the rows come from the ``semi`` protocol."""
    table = efficiency_table(rows)
    semi = any(t["stage"] for t in table)
    lines = [
        "# Data-efficiency study",
        "",
        f"Pre-training: `{method}` on the training images of `{data}` (never its test cases). Each fine-tuning "
        "uses a seeded, nested share of the labelled training cases; every model is tested on the same held-out "
        "test cases (mean Dice over the foreground classes, HD95 in mm; mean +- std over seeds).",
        "",
    ]
    if semi:
        lines += [
            "Protocol `semi` (SwinMM Table 5): at each label ratio a multi-view base model is fine-tuned on the "
            "labelled share only (stage `base`); training then continues from its weights (stage `semi`, a new run "
            "of as many steps, its own warm-up and cosine schedule) with the training cases the share leaves out "
            "added unlabelled: their crops are trained against the views' pseudo-labels, their label files never "
            "read, the validation cases left out. At 100% none is left out: the semi stage there is the extra "
            "steps alone, the control for the other ratios. SwinMM's base starts from scratch: the `scratch` rows.",
            "",
        ]
    header = ["label ratio", "training cases", *(["unlabelled cases"] if semi else []), "init",
              *(["stage"] if semi else []), "Dice", "HD95", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for t in table:
        counts = ["/".join(map(str, t["train_cases"]))] + (["/".join(map(str, t["unlabeled_cases"]))] if semi else [])
        cells = [f"{t['ratio']:.0%}", *counts, t["init"], *([t["stage"]] if semi else []),
                 f"{t['dice'][0]:.3f} +- {t['dice'][1]:.3f}", f"{t['hd95'][0]:.1f} +- {t['hd95'][1]:.1f}",
                 str(t["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    dice = {(t["ratio"], t["init"], t["stage"]): t["dice"][0] for t in table}
    lines += ["", f"Gain of `{method}` over scratch in mean Dice, per ratio{' and stage' if semi else ''}:", ""]
    lines += [f"- {ratio:.0%}{f' ({stage})' if semi else ''}: {value - dice[ratio, 'scratch', stage]:+.3f}"
              for (ratio, init, stage), value in dice.items() if init == method]
    if semi:
        lines += ["", "Gain of the semi stage over its base in mean Dice, per ratio and init:", ""]
        lines += [f"- {ratio:.0%}, {init}: {value - dice[ratio, init, 'base']:+.3f}"
                  for (ratio, init, stage), value in dice.items() if stage == "semi"]
    paired = ("paired over test cases x seeds (mean Dice over the foreground classes; bootstrap 95% interval of "
              "the mean difference, two-sided Wilcoxon signed-rank test)")
    if verdicts:
        which = f" of `{method}` against scratch at the semi stage" if semi else ""
        lines += ["", f"Verdict per ratio{which}, {paired}:", ""]
        lines += [f"- {float(ratio):.0%}: {v['sentence']}" for ratio, v in verdicts.items()]
    if stage_verdicts:
        lines += ["", "Verdict of the semi stage against its base, per ratio and init, paired likewise:", ""]
        lines += [f"- {float(ratio):.0%}, {init}: {v['sentence']}" for ratio, by_init in stage_verdicts.items()
                  for init, v in by_init.items()]
    if compute:
        lines += ["", f"Pre-training cost {compute['device_hours']:.3f} device-hours ({compute['wall_hours']:.3f} h on "
                  f"{compute['devices']} process(es))."]
    again = f"swinssl study data-efficiency --out {out}" + (" --protocol semi" if semi else "")
    lines += ["", f"Plot: `dice_vs_label_ratio.png`. Reproduce: `{again}`", ""]
    return "\n".join(lines)


def plot_efficiency(rows: list[dict], path: Path) -> None:
    """Dice against label ratio, one line per init (and stage, for the semi protocol), error bars = std over seeds."""
    points = [{"arm": f"{t['init']} ({t['stage']})" if t["stage"] else t["init"], "ratio": 100 * t["ratio"],
               "dice": t["dice"]} for t in efficiency_table(rows)]
    save_lines(path, points, "arm", "ratio", "labelled training cases (%)", "test mean Dice")


def _train(stage, cfg, progress: bool) -> Path:
    """A training stage's run directory: reused when finished, resumed when started, else run."""
    run_dir = Path(cfg.train.out) / cfg.train.name
    last = RunDir(run_dir).last
    if last.is_file():
        if (read_head(last).step or 0) >= cfg.train.steps:
            return run_dir
        return stage(resume=run_dir, progress=progress)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing to keep
    return stage(cfg, progress=progress)


def _evaluate(run: Path, dataset: Path, pred_dir: Path, progress: bool, view: str = "auto") -> dict:
    """Predict the test cases of ``dataset`` through ``view`` (one axis order or ``fused``; ``auto``:
    the model's own) and evaluate them; reused when already done."""
    summary = EvaluationFolder(pred_dir).read_summary()
    if summary is not None:
        return summary
    images = [c.images[0] for c in find_dataset(dataset).split("test")]
    predict(run, images, pred_dir, PredictOptions(views=view), progress=progress)
    return evaluate(pred_dir, dataset, out_dir=pred_dir, split="test")


def modality_report(rows: list[dict], preset: dict, out: Path) -> str:
    inits = list(dict.fromkeys(r["init"] for r in rows))
    lines = [
        "# Out-of-modality study",
        "",
        f"Paired CT/MRI phantoms ({preset['cases']} cases, {preset['size']}^3) in `{out / 'data'}`. Each "
        "pre-training used the same mixed CT + MRI training volumes; each fine-tuning the same cases, steps and "
        "seed; every model is tested on the held-out test cases of both modalities (mean Dice over the foreground "
        "classes, HD95 in mm).",
        "",
        "| init | trained on | tested on CT: Dice | tested on MRI: Dice | tested on CT: HD95 | tested on MRI: HD95 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for init in inits:
        for train_mod in MODALITIES:
            cell = {r["tested_on"]: r for r in rows if r["init"] == init and r["trained_on"] == train_mod}
            lines.append(f"| {init} | {train_mod} | {cell['CT']['dice']:.3f} | {cell['MRI']['dice']:.3f} | "
                         f"{cell['CT']['hd95']:.1f} | {cell['MRI']['hd95']:.1f} |")
    lines += ["", "Out-of-modality mean Dice (CT->MRI, MRI->CT):", ""]
    for init in inits:
        cross = [r["dice"] for r in rows if r["init"] == init and r["trained_on"] != r["tested_on"]]
        lines.append(f"- {init}: {sum(cross) / len(cross):.3f}")
    lines += ["", "Reproduce: `swinssl study modality --out " + str(out) + "`", ""]
    return "\n".join(lines)
