"""Training commands: pretrain, finetune, the estimate before them, the probe, and the demo."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from swinssl.cli.common import PRESETS_HELP, app, console, say, user_errors

ESTIMATE_FIRST = typer.Option(True, "--estimate/--no-estimate", help="First measure a few steps in a separate "
                              "process and print the expected peak memory and time (swinssl estimate).")


@app.command()
def pretrain(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. data=PATH train.steps=500."),
    config: List[str] = typer.Option(["pretrain/swin_unetr_tiny"], "--config", "-c", help=f"{PRESETS_HELP} "
                                     "(pretrain/...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its last checkpoint."),
    estimate_first: bool = ESTIMATE_FIRST,
) -> None:
    """Self-supervised pre-training of a Swin encoder (method from the config) on unlabelled volumes.

    Methods (method.name): swin_unetr (inpainting + rotation + contrastive), swinmm
    (masked multi-view reconstruction + rotation + contrastive + mutual) and swinfuse
    (the Swin UNETR tasks on CT + MRI with a domain-invariance module and a density loss).
    Tasks of different methods combine by config alone (method.views, method.weights,
    model.encoder; e.g. pretrain/swinmm_fuse_tiny). Writes a run directory (config, data manifest,
    metrics.csv, TensorBoard, previews, checkpoints/last.pt, written atomically) and prints where it
    is. The encoder loads into SwinUNETR with swinssl.nn.load_pretrained. A killed run continues
    with --resume RUN_DIR.

    At start it prints the estimate of swinssl estimate (peak memory, s/step, the whole run's time;
    --no-estimate skips it); a run that runs out of memory ends with one line naming that
    estimate and a setting that fits.
    """
    from swinssl.engine.pretrain import pretrain as run

    _train(run, config, overrides or [], resume, "pretrain", estimate_first)


@app.command()
def finetune(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, e.g. data=PATH finetune.pretrained=RUN_DIR finetune.label_ratio=0.1."),
    config: List[str] = typer.Option(["finetune/tiny"], "--config", "-c", help=f"{PRESETS_HELP} (finetune/...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory (or cross-validation "
                                          "folder) from its last checkpoint."),
    estimate_first: bool = ESTIMATE_FIRST,
) -> None:
    """Fine-tune SwinUNETR for segmentation, from scratch or from pre-trained weights.

    Uses the labelled training cases of a dataset.json, nnU-Net raw folder or labelled folder
    (never its test cases). model.multiview=true (finetune/swinmm) trains SwinMM's two-view
    network with cross-view attention (model.cross_attention_at: bottleneck, intermediate or none)
    and view consistency (finetune.consistency: kl or cosine); finetune.unlabeled=PATH (or rest: the
    training cases the label ratio leaves out) adds pseudo-labelled unlabelled volumes. A network
    with SwinFUSE's domain-invariance module (finetune/swinfuse) gets the crop and a cut-out copy
    as its two streams (finetune.dim_cutout). Writes a run directory with checkpoints/best.pt (best
    validation Dice) and last.pt, metrics.csv, TensorBoard and PNG overlays, and prints where it is.

    From finetune.pretrained=RUN, the pre-trained plan's network and input (orientation, spacing,
    CT window, MRI normalisation) are adopted, each change printed (finetune.adopt_preprocessing=false
    keeps this config's input); an encoder pre-trained on another modality is refused unless
    finetune.allow_modality_change=true.

    finetune.folds=5 finetune.fold=all trains every fold, one after the other, into one folder
    (fold_0 ... fold_4, each such a run directory, and folds.json): swinssl predict FOLDER
    ensembles them, and --resume FOLDER continues the folds.

    At start it prints the estimate of swinssl estimate (peak memory, s/step, the whole run's time;
    --no-estimate skips it); a run that runs out of memory ends with one line naming that
    estimate and a setting that fits.
    """
    from swinssl.engine.finetune import finetune as run

    _train(run, config, overrides or [], resume, "finetune", estimate_first)


def _train(run, config: List[str], overrides: List[str], resume: Optional[Path], stage: str,
           estimate_first: bool) -> None:
    """Start a training stage from presets + overrides, or resume its run directory; print where it is."""
    from swinssl.config import load_config
    from swinssl.workflows.estimate import estimate_at_start

    with user_errors():
        cfg = load_config(config, overrides) if resume is None else None
        found = estimate_at_start(stage, cfg, resume, overrides, say) if estimate_first else None
        if found is not None:
            typer.echo(found.line())
        run_dir = run(cfg, resume=resume, overrides=overrides, start_estimate=found and found.hint())
    typer.echo(f"run directory: {run_dir}")


@app.command()
def estimate(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, e.g. data=PATH train.batch_size=4 preprocess.roi_size=128."),
    config: Optional[List[str]] = typer.Option(None, "--config", "-c", help=f"{PRESETS_HELP}, as for pretrain / "
                                               "finetune (a run's config.yaml too) \\[default: pretrain/swin_unetr_tiny "
                                               "for pretrain, finetune/tiny for finetune and predict]."),
    stage: str = typer.Option("pretrain", "--stage", help="pretrain, finetune or predict."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda \\[default: the config's "
                                         "train.accelerator; auto: cuda when there is one]."),
    memory_budget: Optional[float] = typer.Option(None, "--memory-budget", help="GiB to fit in: also measure at one "
                                                  "crop and suggest the largest train.batch_size and cubic "
                                                  "preprocess.roi_size that fit."),
    steps: int = typer.Option(3, "--steps", help="Optimiser steps the probe runs (the first is a warm-up, not "
                              "timed)."),
    shape: Optional[List[int]] = typer.Option(None, "--shape", help="predict: the preprocessed volume, X Y Z (repeat "
                                              "three times: --shape 256 --shape 256 --shape 128) \\[default: the "
                                              "first test volume of data=, else 256 256 128]."),
    overlap: Optional[float] = typer.Option(None, "--overlap", min=0.0, max=0.99, help="predict: sliding-window "
                                            "overlap \\[default: the config's finetune.overlap, as predict takes "
                                            "it from the plan]."),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size", min=1, help="predict: windows per forward "
                                                "pass \\[default: as swinssl predict chooses on this device]."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the estimate as JSON to this file."),
) -> None:
    """Predict peak memory and seconds per step (per volume for predict) of a config on this device,
    from a short measured probe in a separate process, never the whole job.

    pretrain / finetune: the real stage runs a few optimiser steps, then once what the run does
    after a step: its validation (fine-tuning: the sliding window over the largest validation
    volume, chosen from the file headers; pre-training: its validation losses and the probe of
    train.probe_data), the preview and one checkpoint save, into a temporary folder, on data=
    when given (its preprocessing cache is shared with the run), else on a few synthetic phantoms.
    Peak memory is the worst of these phases, each printed: the process's resident set size on
    CPU, torch's reserved memory on CUDA; s/step is the median of the steps after the first. With
    --memory-budget a second probe at one crop fits the training's peak = base + crops x per-crop
    memory and the largest batch and ROI that fit are printed. With data=, also the disk its
    preprocessing cache takes (at most, from the files' headers, data.cache_dtype) and how much
    of it is already there.

    predict: windows of the ROI through the config's network; seconds per volume = sliding
    windows (as MONAI tiles them at --overlap) x seconds per window; peak = measured + the
    output buffers of the stitching.
    """
    from swinssl.workflows.estimate import estimate_request

    with user_errors():
        found = estimate_request(config, overrides or [], stage, device, memory_budget, steps, shape, overlap,
                                 sw_batch_size, say)
        if json_out is not None:
            found.write_json(json_out)
    for line in found.report():
        typer.echo(line)


@app.command()
def probe(
    model: str = typer.Argument(..., help="A pre-training run or any checkpoint load_pretrained reads, or 'random'."),
    data: Path = typer.Option(..., "--data", help="Labelled dataset (dataset.json, nnU-Net raw or labelled folder)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. preprocess.roi_size=64."),
    config: List[str] = typer.Option(["finetune/tiny"], "--config", "-c", help=f"{PRESETS_HELP}: the data, crops "
                                     "and the network of 'random' (a checkpoint's plan fixes its own network)."),
    steps: int = typer.Option(200, "--steps", min=1, help="Optimiser steps of the probe head."),
    seed: int = typer.Option(0, "--seed", help="Seed of the crops, the head and the random encoder."),
    out: Path = typer.Option(Path("runs/probe"), "--out", "-o", help="Folder for probe.json."),
) -> None:
    """Frozen-encoder probe: how much of a segmentation task an encoder's features hold.

    Freezes the Swin encoder of MODEL, trains only a light head on its five feature maps (1x1x1
    projections, upsampled and summed; no path from the raw image) on the labelled training cases,
    and scores per-class Dice on held-out labelled cases. The same probe on a random encoder of the
    same plan runs beside it as the baseline. Prints a table and writes probe.json.
    """
    from swinssl.config import load_config
    from swinssl.engine.probe import probe_against_random, write_probe

    with user_errors():
        results = probe_against_random(model, load_config(config, [f"data={data}", *(overrides or [])]), steps, seed)
        path = write_probe(results, out)
    table = Table(title=f"frozen-encoder probe, {steps} steps, seed {seed}, held-out cases: "
                        f"{', '.join(results[0].test_cases)}")
    for column in ["encoder", *(f"Dice {name}" for name in results[0].per_class), "mean Dice"]:
        table.add_column(column)
    for r in results:
        table.add_row(r.source, *(f"{v:.3f}" for v in r.per_class.values()), f"{r.dice:.3f}")
    console().print(table)
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for the data, runs and report."),
    fresh: bool = typer.Option(False, "--fresh", help="Replace the contents of --out if it is not empty."),
) -> None:
    """The whole job on synthetic phantoms, CPU, in minutes: pre-train, fine-tune (pre-trained and
    scratch; at once, each with half the threads, on 2 or more), predict the test cases, evaluate,
    and write report.md with plots and report.html with the test cases in a 3D viewer."""
    from swinssl.workflows.demo import run_demo

    with user_errors():
        report = run_demo(out, fresh=fresh)
    typer.echo(report.read_text().split("## Evaluation summaries")[0].rstrip())
    typer.echo(f"\nreport: {report}\nin a browser: {report.with_name('report.html')}")
