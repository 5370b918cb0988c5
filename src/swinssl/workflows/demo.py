"""``swinssl demo``: the whole job on synthetic phantoms, CPU only, in about 11 minutes on 2 cores.

The setting the papers describe, at toy scale: many unlabelled volumes, few labelled ones.

1. Write a phantom dataset (CT, organ labels; a fifth of the cases are test cases).
2. Pre-train a tiny Swin encoder with the Swin UNETR proxy tasks on all training images (their
   labels unread), with the frozen-encoder probe (``train.probe_data``) beside a random encoder.
3. Fine-tune SwinUNETR on three labelled training cases twice: from the pre-trained encoder and
   from scratch, with the same steps, data and seed; on two or more CPU threads, both at once,
   each in a process of its own with half the threads (``finetune_arms``).
4. Predict the held-out test cases with both models and evaluate them (Dice, HD95, NSD); the
   paired verdict (``swinssl.workflows.verdict``) on their per-case mean Dice.
5. Write ``report.md`` and ``results.json`` (Dice per class and init, the probe, the verdict), and
   ``report.html`` (``swinssl.report``: the test cases in a 3D viewer, the curves, the provenance).

Each stage is the same library call that ``swinssl pretrain | finetune | predict | evaluate``
makes; the report lists those commands. Sizes are in ``DEMO`` (plain data).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from swinssl.config import Config, from_dict, load_config, to_dict
from swinssl.data.discover import find_dataset
from swinssl.data.io import read_volume
from swinssl.data.phantom import write_phantom_dataset
from swinssl.engine.finetune import finetune
from swinssl.engine.pretrain import pretrain
from swinssl.errors import ConfigError
from swinssl.infer import predict
from swinssl.metrics import evaluate, format_summary
from swinssl.plots import figure, save_figure, save_overlay, save_probe_curve
from swinssl.report import write_report as write_html_report
from swinssl.results import EvaluationFolder, write_results
from swinssl.runs import RunDir, probe_curve, read_metrics
from swinssl.utils import atomic_write_text
from swinssl.workflows.fresh import FreshProcess
from swinssl.workflows.verdict import paired_verdict

DEMO = {
    "cases": 30,  # phantoms
    "test_fraction": 0.2,  # 6 test cases, 24 training volumes
    "size": 64,  # voxels per side
    # Overlay presets (configs/demo/) laid over pretrain/swin_unetr_tiny and finetune/tiny: small
    # enough for about 11 minutes on 2 CPU cores. Fine-tuning takes 3 of the labelled cases.
    "pretrain": ["pretrain/swin_unetr_tiny", "demo/pretrain"],
    "finetune": ["finetune/tiny", "demo/finetune"],  # the same for both initialisations
    "overrides": [],  # key=value laid over both stages (tests run a smaller demo with them)
}
LIMITS = ("This CPU demo trains a network of feature size 12 for minutes on synthetic phantoms: it shows "
          "the whole pipeline and measures, on its own small scale, whether its pre-training paid off; it "
          "cannot show what pre-training does for a full-size network on real scans, which takes GPU-days "
          "and real data (see docs/methods.md and swinssl study data-efficiency).")
INITS = ("scratch", "pretrained")


def run_demo(out: str | Path = "runs/demo", fresh: bool = False, progress: bool = True,
             settings: dict | None = None) -> Path:
    """Run every stage into ``out`` (one sub-directory per stage) and return the report's path.
    ``settings``: entries of ``DEMO`` to replace."""
    demo = {**DEMO, **(settings or {})}
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not fresh:
            raise ConfigError(f"{out}: exists and is not empty; pass --out to another folder or --fresh to replace it")
        _clear(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):
        tick = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - tick
        return result

    data = timed("phantoms", write_phantom_dataset, out / "data", cases=demo["cases"], size=demo["size"], seed=0,
                 test_fraction=demo["test_fraction"])
    common = [f"data={data}", f"train.out={out}", *demo["overrides"]]
    pre_cfg = load_config(demo["pretrain"], [*common, "train.name=pretrain", f"train.probe_data={data}"])
    pre_run = timed("pretrain", pretrain, pre_cfg, progress=progress)
    configs = {init: load_config(demo["finetune"], [*common, f"train.name=finetune_{init}",
                                                    *([f"finetune.pretrained={pre_run}"] if init == "pretrained" else [])])
               for init in INITS}
    runs = timed("finetune, both", finetune_arms, configs, progress, timings)
    test_images = [c.images[0] for c in find_dataset(data).split("test")]
    summaries = {}
    for init in INITS:
        pred_dir = out / f"predictions_{init}"
        timed(f"predict {init}", predict, runs[init], test_images, pred_dir, progress=progress)
        summaries[init] = timed(f"evaluate {init}", evaluate, pred_dir, data, out_dir=pred_dir, split="test")
    timings["total"] = time.perf_counter() - started
    results = demo_results(pre_run, summaries, {init: EvaluationFolder(out / f"predictions_{init}").case_dice() for init in INITS})
    write_results(out, "demo", results)
    report = write_report(out, data, demo, pre_run, runs, summaries, results, test_images, timings)
    write_html_report(out, out / "report.html")
    return report


def finetune_arms(configs: dict[str, Config], progress: bool, timings: dict[str, float]) -> dict[str, Path]:
    """Fine-tune each arm and return its run directory; each arm's seconds go into ``timings``.

    With two or more CPU threads the arms run at once, each in a process of its own with half
    the threads: the tiny network's small tensors leave a second thread idle much of a step
    (a 1-thread step costs 1.55x a 2-thread one on 2 cores), so together they finish about a
    fifth sooner than one after the other (480-516 s against 626 s on 2 cores). Off the CPU, or
    on one thread, they run in turn.
    """
    threads = torch.get_num_threads()
    if threads < 2 or any(c.train.accelerator != "cpu" for c in configs.values()):
        runs = {}
        for init, cfg in configs.items():
            tick = time.perf_counter()
            runs[init] = finetune(cfg, progress=progress)
            timings[f"finetune {init}"] = time.perf_counter() - tick
        return runs
    per_arm = max(1, threads // len(configs))
    if per_arm == 1:
        # No core left for a data worker: it would wait for CPU time while its arm waits for it
        # (1-thread arms on 2 cores: 6% slower with one worker each). Batches are the same either
        # way (each crop is seeded by its key, not by the process that makes it).
        configs = {init: replace(cfg, train=replace(cfg.train, num_workers=0)) for init, cfg in configs.items()}
    if progress:
        print(f"fine-tuning {' and '.join(configs)} at once ({per_arm} thread{'s' if per_arm > 1 else ''} each)")
    jobs = {init: FreshProcess("swinssl.workflows.demo:finetune_arm", {"config": to_dict(cfg)}, threads=per_arm)
            for init, cfg in configs.items()}
    if progress:
        _follow(configs, jobs)
    done = {init: job.result() for init, job in jobs.items()}
    timings.update({f"finetune {init}": seconds for init, (_, seconds) in done.items()})
    return {init: Path(run) for init, (run, _) in done.items()}


def finetune_arm(payload: dict) -> tuple[str, float]:
    """One arm in its own process (``workflows.fresh``): its run directory and seconds."""
    tick = time.perf_counter()
    run = finetune(from_dict(Config, payload["config"], source="demo arm"), progress=False)
    return str(run), time.perf_counter() - tick


def _follow(configs: dict[str, Config], jobs: dict) -> None:
    """One progress bar for the arms running in other processes: the last logged step of each
    (their ``metrics.csv``)."""
    from tqdm import tqdm

    total = sum(c.train.steps for c in configs.values())
    last = dict.fromkeys(configs, 0)
    with tqdm(total=total, desc="finetune, both", unit="step", dynamic_ncols=True) as bar:
        while not all(job.done() for job in jobs.values()):
            time.sleep(1.0)
            for init, cfg in configs.items():
                try:
                    last[init] = max(row["step"] for row in read_metrics(Path(cfg.train.out) / cfg.train.name))
                except (OSError, ValueError, TypeError):  # not written yet, no row yet, or a row half written
                    pass
            bar.update(sum(last.values()) - bar.n)


def demo_results(pre_run: Path, summaries: dict[str, dict], cases: dict[str, dict[str, float]]) -> dict:
    """``results.json``: ``dice`` -> init -> class name -> test Dice (and ``mean``); ``probe`` -> random /
    pretrained -> the last probe's mean Dice; ``verdict`` -> the paired verdict's line on the test
    cases' mean Dice (``verdict_detail``: its numbers); ``case_dice`` -> init -> case -> mean Dice."""
    dice = {init: {info["name"]: info["dice"]["mean"] for info in summaries[init]["classes"].values()}
            for init in INITS}
    for init in INITS:
        dice[init]["mean"] = summaries[init]["mean"]["dice"]
    curve, random = probe_curve(read_metrics(pre_run))
    probe = {"random": random, "pretrained": curve[max(curve)] if curve else None}
    ids = sorted(set(cases["pretrained"]) & set(cases["scratch"]))
    verdict = paired_verdict([cases["pretrained"][c] for c in ids], [cases["scratch"][c] for c in ids])
    return {"dice": dice, "probe": probe, "verdict": verdict.sentence, "verdict_detail": verdict.to_dict(),
            "case_dice": cases}


def _clear(folder: Path) -> None:
    import shutil

    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


# --- report ------------------------------------------------------------------------------------------


def write_report(out: Path, data: Path, demo: dict, pre_run: Path, runs: dict[str, Path], summaries: dict[str, dict],
                 results: dict, test_images: list[Path], timings: dict[str, float]) -> Path:
    plot_losses(out / "loss_curves.png", pre_run, runs)
    save_probe_curve(out / "probe_curve.png", *probe_curve(read_metrics(pre_run)),
                     title="frozen-encoder probe during pre-training")
    plot_dice(out / "dice_by_class.png", summaries)
    first = test_images[0]
    case_id = first.name.split(".")[0]
    image = read_volume(first)[0]
    shown = ((image + 175.0) / 425.0).clamp(0, 1)  # the fine-tuning CT window, -175..250 HU
    label_path = next(c.label for c in find_dataset(data).split("test") if c.images[0] == first)
    masks = {"label": read_volume(label_path)[0].long()}
    masks.update({init: read_volume(out / f"predictions_{init}" / f"{case_id}.nii.gz")[0].long() for init in INITS})
    save_overlay(out / "overlay.png", image=shown, masks=masks, title=f"{case_id} (test case)")

    used = len(RunDir(runs["scratch"]).read_manifest()["train"])
    volumes = RunDir(pre_run).read_manifest()
    probe, verdict = results["probe"], results["verdict"]
    lines = [
        "# swinssl demo",
        "",
        f"Synthetic CT phantoms ({demo['cases']} cases, {demo['size']}^3): `{data}`. "
        f"{len(test_images)} test cases are held out from pre-training and fine-tuning.",
        "",
        "The same results in a browser, with the test cases in a 3D viewer (image, label and both "
        "predictions): open `report.html` (one file, no network needed).",
        "",
        "## Did pre-training pay off?",
        "",
        f"- Verdict on the test cases' mean Dice, pre-trained vs scratch: **{verdict}**",
        f"- Frozen-encoder probe (mean Dice on held-out cases): pre-trained encoder "
        f"{_value(probe['pretrained'])}, random encoder {_value(probe['random'])}.",
        f"- {LIMITS}",
        "",
        "## Pre-training (Swin UNETR proxy tasks)",
        "",
        f"Run: `{pre_run}`: {len(volumes['train'])} unlabelled training volumes ({len(volumes['validation'])} "
        "more held out for the validation loss). Mean of the first and last 10% of logged training steps:",
        "",
        "| loss | first | last |",
        "| --- | --- | --- |",
        *[f"| {name} | {a:.4f} | {b:.4f} |" for name, (a, b) in first_last(pre_run).items()],
        "",
        "The probe freezes the encoder and trains only a linear head on its feature maps (no path from the "
        "image), on fixed crops of the labelled training cases (their labels are read for this diagnostic "
        "only), and scores it on the fine-tuning's validation cases; the dashed line is the same probe on a "
        "random encoder of the same plan.",
        "",
        "![probe curve](probe_curve.png)",
        "",
        f"## Fine-tuning on {used} labelled case{'s' if used != 1 else ''}, then the test cases",
        "",
        "Both runs use the same cases, steps and seed; only the encoder's start differs.",
        "",
        dice_table(summaries),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![Dice by class](dice_by_class.png)",
        "",
        "![overlay](overlay.png)",
        "",
        "## Evaluation summaries",
        "",
        *[f"### {init}\n\n```\n{format_summary(summaries[init])}\n```\n" for init in INITS],
        "## Time (s, this machine)",
        "",
        "| stage | seconds |",
        "| --- | --- |",
        *[f"| {k} | {v:.0f} |" for k, v in timings.items()],
        "",
        "## The same stages as commands",
        "",
        "```",
        f"swinssl phantom --out {data.parent} --cases {demo['cases']} --size {demo['size']} "
        f"--test-fraction {demo['test_fraction']}",
        f"swinssl pretrain {_configs(demo['pretrain'])} data={data} train.out={out} train.name=pretrain "
        f"train.probe_data={data}",
        f"swinssl finetune {_configs(demo['finetune'])} data={data} train.out={out} train.name=finetune_pretrained "
        f"finetune.pretrained={pre_run}",
        f"swinssl predict {runs['pretrained']} {' '.join(map(str, test_images))} --out {out}/predictions_pretrained",
        f"swinssl evaluate {out}/predictions_pretrained {data} --split test",
        "```",
        "",
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def _value(x: float | None) -> str:
    return "not measured" if x is None else f"{x:.3f}"


def _configs(presets: list[str]) -> str:
    return " ".join(f"-c {p}" for p in presets)


def first_last(run: Path, split: str = "train") -> dict[str, tuple[float, float]]:
    """Mean of the first and last 10% of the logged values of each loss."""
    series: dict[str, list[float]] = {}
    for row in read_metrics(run):
        if row["split"] == split and row["name"] not in ("lr", "crops_per_s", "skipped_steps", "startup_s"):
            series.setdefault(row["name"], []).append(row["value"])
    out = {}
    for name, values in series.items():
        n = max(1, len(values) // 10)
        out[name] = (sum(values[:n]) / n, sum(values[-n:]) / n)
    return out


def dice_table(summaries: dict[str, dict]) -> str:
    classes = summaries[INITS[0]]["classes"]
    rows = ["| class | " + " | ".join(f"Dice {i}" for i in INITS) + " | " + " | ".join(f"HD95 mm {i}" for i in INITS) + " |",
            "| --- " * (1 + 2 * len(INITS)) + "|"]
    for key, info in classes.items():
        dice = [f"{summaries[i]['classes'][key]['dice']['mean']:.3f}" for i in INITS]
        hd = [f"{summaries[i]['classes'][key]['hd95']['mean']:.1f}" for i in INITS]
        rows.append(f"| {info['name']} | " + " | ".join(dice) + " | " + " | ".join(hd) + " |")
    rows.append("| **mean** | " + " | ".join(f"**{summaries[i]['mean']['dice']:.3f}**" for i in INITS) + " | "
                + " | ".join(f"{summaries[i]['mean']['hd95']:.1f}" for i in INITS) + " |")
    return "\n".join(rows)


def plot_losses(path: Path, pre_run: Path, runs: dict[str, Path]) -> None:
    fig, axes = figure(3, 13 / 3, 3.6)
    for name in ("inpaint", "rotate", "contrast"):
        steps, values = _series(pre_run, "train", name)
        axes[0].plot(steps, values, label=name)
    axes[0].set(title="pre-training losses", xlabel="step")
    for init, run in runs.items():
        axes[1].plot(*_series(run, "train", "loss"), label=init)
        axes[2].plot(*_series(run, "val", "dice"), marker="o", label=init)
    axes[1].set(title="fine-tuning DiceCE loss", xlabel="step")
    axes[2].set(title="validation mean Dice", xlabel="step", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=8)
    save_figure(path, fig)


def plot_dice(path: Path, summaries: dict[str, dict]) -> None:
    classes = summaries[INITS[0]]["classes"]
    names = [info["name"] for info in classes.values()]
    fig, (ax,) = figure(1, 6.0, 3.6)
    width = 0.8 / len(INITS)
    for i, init in enumerate(INITS):
        means = [summaries[init]["classes"][k]["dice"]["mean"] for k in classes]
        stds = [summaries[init]["classes"][k]["dice"]["std"] for k in classes]
        ax.bar([j + i * width for j in range(len(names))], means, width, yerr=stds, capsize=3, label=init)
    ax.set_xticks([j + width * (len(INITS) - 1) / 2 for j in range(len(names))], names)
    ax.set(ylabel="test Dice", ylim=(0, 1), title="Dice by class (test cases)")
    ax.legend(fontsize=8)
    save_figure(path, fig)


def _series(run: Path, split: str, name: str) -> tuple[list[int], list[float]]:
    rows = [r for r in read_metrics(run) if r["split"] == split and r["name"] == name]
    return [r["step"] for r in rows], [r["value"] for r in rows]
