"""The ``swinssl`` command line. Each command parses its options and calls one library function.

Exit codes: 0 success; 1 ``data check`` found problems; 2 usage, config or environment error
(e.g. an nnU-Net version the bridge was not tested with);
3 a data or checkpoint error stopped the command (the message names the file);
4 training stopped (non-finite loss or gradients, a checkpoint that cannot be written, a
failed process of a distributed run; the last good checkpoint is kept); 5 an output folder
cannot be written (checked before the work starts).
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import shutil
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

import swinssl
from swinssl.errors import SwinsslError

app = typer.Typer(
    name="swinssl",
    help="Self-supervised pre-training and fine-tuning of 3D Swin transformers for CT and MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
config_app = typer.Typer(help="Show configurations and presets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
study_app = typer.Typer(help="Check the papers' claims on small data, one command per study.", no_args_is_help=True)
app.add_typer(study_app, name="study")
nnunet_app = typer.Typer(help="Fine-tune a swinssl pre-trained encoder inside nnU-Net v2 (pip install 'swinssl\\[nnunet]').",
                         no_args_is_help=True)
app.add_typer(nnunet_app, name="nnunet")


class _LazyChoices(enum.EnumMeta):
    """Metaclass of an option type whose choices are loaded when first needed.

    typer lists and checks an Enum option's choices by iterating its class, and does so only for
    the command being run or helped. The choices below come from modules that import torch
    (seconds), so they are loaded then, and ``swinssl --help`` or ``swinssl phantom`` stay fast.
    Iterating yields the members of a plain str Enum built from the loaded choices.
    """

    def _loaded_members(cls) -> list:
        if "_loaded" not in cls.__dict__:
            loaded = enum.Enum(cls.__name__, {v: v for v in cls._load()}, type=str)
            type.__setattr__(cls, "_loaded", loaded)
        return list(cls.__dict__["_loaded"])

    def __iter__(cls):
        return iter(cls._loaded_members())

    def __len__(cls) -> int:
        return len(cls._loaded_members())


def _lazy_choices(name: str, load: Callable[[], Iterable[str]]) -> type:
    """An option type (a str Enum) whose choices are ``load()``, called on first use."""

    class Choices(str, enum.Enum, metaclass=_LazyChoices):
        pass

    Choices.__name__ = Choices.__qualname__ = name
    type.__setattr__(Choices, "_load", staticmethod(load))
    return Choices


def _view_choices() -> list[str]:
    from swinssl.methods import view_choices

    return view_choices()


def _study_presets(table: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        import swinssl.workflows.study

        return list(getattr(swinssl.workflows.study, table))

    return load


ViewsChoice = _lazy_choices("ViewsChoice", _view_choices)  # the methods registry's choices
ModalityPreset = _lazy_choices("ModalityPreset", _study_presets("PRESETS"))
EfficiencyPreset = _lazy_choices("EfficiencyPreset", _study_presets("EFFICIENCY"))
ViewsPreset = _lazy_choices("ViewsPreset", _study_presets("VIEWS"))
EfficiencyProtocol = _lazy_choices("EfficiencyProtocol", _study_presets("PROTOCOLS"))
Modality = Literal["CT", "MRI", "auto"]
OutputFormat = Literal["nifti", "same"]
Device = Literal["auto", "cpu", "cuda"]
Split = Literal["training", "validation", "test"]


def _console(stderr: bool = False) -> Console:
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
    return Console(width=width, stderr=stderr, highlight=False)


_debug = False  # --debug: errors keep their traceback


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Report a ``SwinsslError`` as one line on stderr and exit with its code (``--debug``: the
    traceback first, a data worker's included)."""
    try:
        yield
    except SwinsslError as err:
        if _debug:
            typer.echo(traceback.format_exc() + err.worker_traceback, err=True)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except OSError as err:  # unwritable output folder, full disk, ...
        where = err.filename or "output"
        typer.echo(f"error: {where}: {err.strerror or err}", err=True)
        raise typer.Exit(3) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"swinssl {swinssl.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error, not only its one line."),
) -> None:
    global _debug
    _debug = debug


@app.command()
def phantom(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the dataset into."),
    cases: int = typer.Option(8, "--cases", min=1, help="Number of cases (the last ones become test cases)."),
    size: int = typer.Option(96, "--size", min=32, help="Volume side in voxels."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed writes the same data."),
    test_fraction: float = typer.Option(0.25, "--test-fraction", min=0.0, max=0.99,
                                        help="Share of the cases held out as test cases (at least one)."),
) -> None:
    """Write a synthetic labelled dataset: paired CT and MRI phantoms with organ labels (MSD layout)."""
    from swinssl.data.phantom import write_phantom_dataset

    with _user_errors():
        dataset_json = write_phantom_dataset(out, cases=cases, size=size, seed=seed, test_fraction=test_fraction)
    typer.echo(f"wrote {cases} phantom cases ({size}^3, CT + MRI) to {out}; dataset files: {dataset_json} and {dataset_json.with_name('dataset_mri.json')}")


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="A folder of volumes, a dataset.json (MSD or nnU-Net), or an nnU-Net raw folder."),
    modality: Modality = typer.Option("auto", "--modality", help="CT, MRI, or auto (folder names, then intensities)."),
) -> None:
    """Read every volume and list file, modality, shape, spacing, orientation, intensities and label classes.

    Exits with 1 and one line per problem when a volume is unreadable or inconsistent.
    """
    from swinssl.data.check import check_dataset
    from swinssl.data.discover import find_dataset

    with _user_errors():
        dataset = find_dataset(path, modality=modality)
    with _progress(len(dataset.cases), "reading") as tick:
        reports, problems = check_dataset(dataset, progress=tick)

    table = Table(title=f"{dataset.root} ({dataset.layout} layout, {len(dataset.cases)} volumes)")
    for column in ("file", "modality", "shape", "spacing (mm)", "orientation", "intensity range", "label classes"):
        table.add_column(column, overflow="fold")
    for r in reports:
        table.add_row(
            r.file,
            r.modality,
            "x".join(map(str, r.shape)),
            "x".join(f"{s:.3g}" for s in r.spacing),
            r.orientation,
            f"{r.intensity[0]:.4g} .. {r.intensity[1]:.4g}",
            "-" if r.label_classes is None else ",".join(map(str, r.label_classes)),
        )
    _console().print(table)
    if dataset.labels:
        typer.echo("declared classes: " + ", ".join(f"{k}={v}" for k, v in sorted(dataset.labels.items())))
    warnings = [line for r in reports for line in r.warnings]
    for line in warnings:
        typer.echo(f"warning: {line}", err=True)
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    if problems:
        typer.echo(f"{len(problems)} of {len(dataset.cases)} volumes have problems", err=True)
        raise typer.Exit(1)
    doubtful = len({r.file for r in reports if r.warnings})
    typer.echo(f"all {len(reports)} volumes readable and consistent"
               + (f"; {doubtful} with warnings above" if doubtful else ""))


@app.command()
def pretrain(
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. data=PATH train.steps=500."),
    config: List[str] = typer.Option(["pretrain/swin_unetr_tiny"], "--config", "-c", help="Preset name or YAML "
                                     "file (pretrain/swin_unetr, pretrain/swinmm, pretrain/swinfuse, their _tiny CPU "
                                     "versions, pretrain/swinmm_fuse_tiny); repeat to lay presets over one another."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory from its last checkpoint."),
    estimate_first: bool = typer.Option(True, "--estimate/--no-estimate", help="First measure a few steps in a "
                                        "separate process and print the expected peak memory and time (swinssl "
                                        "estimate)."),
) -> None:
    """Self-supervised pre-training of a Swin encoder (method from the config) on unlabelled volumes.

    Methods (method.name): swin_unetr (inpainting + rotation + contrastive), swinmm
    (masked multi-view reconstruction + rotation + contrastive + mutual) and swinfuse
    (the Swin UNETR tasks on CT + MRI with a domain-invariance module and a density loss).
    Tasks of different methods combine by config alone (method.views, method.weights,
    model.domain_invariance; e.g. pretrain/swinmm_fuse_tiny). Writes a run directory (config, data manifest, metrics.csv, TensorBoard, previews,
    checkpoints/last.pt, written atomically) and prints where it is. The encoder loads into
    SwinUNETR with swinssl.nn.load_pretrained. A killed run continues with --resume RUN_DIR.

    At start it prints the estimate of swinssl estimate (peak memory, s/step, the whole run's time;
    --no-estimate skips it); a run that runs out of memory ends with one line naming that
    estimate and a setting that fits.
    """
    from swinssl.engine.pretrain import pretrain as run

    _train(run, config, overrides, resume, "pretrain", estimate_first)


@app.command()
def finetune(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, e.g. data=PATH finetune.pretrained=RUN_DIR finetune.label_ratio=0.1."),
    config: List[str] = typer.Option(["finetune/tiny"], "--config", "-c", help="Preset name or YAML file "
                                     "(finetune/ct, finetune/mri, finetune/swinmm, finetune/swinfuse, finetune/tiny, "
                                     "finetune/swinmm_tiny); repeat to lay presets over one another."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this run directory (or cross-validation "
                                          "folder) from its last checkpoint."),
    estimate_first: bool = typer.Option(True, "--estimate/--no-estimate", help="First measure a few steps in a "
                                        "separate process and print the expected peak memory and time (swinssl "
                                        "estimate)."),
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

    _train(run, config, overrides, resume, "finetune", estimate_first)


def _train(run, config: List[str], overrides: Optional[List[str]], resume: Optional[Path], stage: str,
           estimate_first: bool) -> None:
    """Start a training stage from presets + overrides, or resume its run directory; print where it is.
    With ``estimate_first``, print the estimate before and hand it to the run for its out-of-memory line."""
    from swinssl.config import load_config

    with _user_errors():
        cfg = load_config(config, overrides or []) if resume is None else None
        hint = _estimate_at_start(stage, cfg, resume, overrides or []) if estimate_first else None
        run_dir = run(cfg, resume=resume, overrides=overrides or [], start_estimate=hint)
    typer.echo(f"run directory: {run_dir}")


def _estimate_at_start(stage: str, cfg, resume: Optional[Path], overrides: List[str]) -> Optional[dict]:
    """Print the estimate of a run about to start (one line), and return its hint for the run; None
    when there is none. A config or data problem is left for the run to report; any other failure
    of the probe is said in a line and the run starts anyway."""
    import os

    from swinssl.workflows.estimate import PROBE_STEPS, FreshProcessFailed, device_of, estimate

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun started every process: no probe in each
        return None
    if resume is not None:
        from swinssl.config import load_config
        from swinssl.runs import RunDir

        if not RunDir(resume).config.is_file():
            return None
        cfg = load_config(RunDir(resume).config, overrides)
    device = device_of(cfg)
    if not cfg.data.path or not Path(cfg.data.path).exists() or device is None:
        return None
    typer.echo(f"estimate: measuring {PROBE_STEPS} steps in a separate process (--no-estimate skips this)", err=True)
    try:
        found = estimate(cfg, stage, device)
    except FreshProcessFailed as err:
        if err.out_of_memory or err.exit_code not in (2, 3, 5):  # config, data, output: the run says which
            typer.echo(f"estimate: not available ({err})", err=True)
        return None
    except SwinsslError:
        return None
    typer.echo(found.line())
    return found.hint()


@app.command()
def estimate(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="key=value overrides, e.g. data=PATH train.batch_size=4 preprocess.roi_size=128."),
    config: Optional[List[str]] = typer.Option(None, "--config", "-c", help="Preset name or YAML file, as for "
                                               "pretrain / finetune (a run's config.yaml too); repeat to lay presets "
                                               "over one another \\[default: pretrain/swin_unetr_tiny for pretrain, "
                                               "finetune/tiny for finetune and predict]."),
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

    pretrain / finetune: the real stage runs a few optimiser steps (validation, previews and
    checkpoints off) into a temporary folder, on data= when given (its preprocessing cache is
    shared with the run), else on a few synthetic phantoms. Peak memory is the process's peak
    resident set size on CPU and torch's reserved memory on CUDA; s/step is the median of the
    steps after the first. With --memory-budget a second probe at one crop fits peak = base +
    crops x per-crop memory and the largest batch and ROI that fit are printed.

    predict: windows of the ROI through the config's network; seconds per volume = sliding
    windows (as MONAI tiles them at --overlap) x seconds per window; peak = measured + the
    output buffers of the stitching.
    """
    import json

    from swinssl.config import load_config
    from swinssl.workflows.estimate import check_request, device_of, estimate as run
    from swinssl.errors import ConfigError

    with _user_errors():
        presets = config or ["pretrain/swin_unetr_tiny" if stage == "pretrain" else "finetune/tiny"]
        cfg = load_config(presets, overrides or [])
        device = device or device_of(cfg)
        if device is None:
            raise ConfigError(f"train.accelerator {cfg.train.accelerator}: the estimate measures cpu or cuda; "
                              "pass --device")
        check_request(stage, device, memory_budget, steps)
        if shape is not None and len(shape) != 3:
            raise ConfigError(f"--shape: three sizes X Y Z, got {len(shape)}")
        if stage == "predict" and sw_batch_size is None:
            import dataclasses

            from swinssl.infer.volume import network_window_batch

            sw_batch_size = network_window_batch(dataclasses.asdict(cfg.model), cfg.preprocess.roi_size, device)
        typer.echo(f"estimate: measuring {stage} of {' + '.join(presets)} on {device} in a separate process", err=True)
        overlap = cfg.finetune.overlap if overlap is None else overlap
        found = run(cfg, stage, device, memory_budget, steps, shape=tuple(shape) if shape else None, overlap=overlap,
                    sw_batch_size=sw_batch_size)
        if json_out is not None:
            from swinssl.utils import atomic_write_text

            atomic_write_text(json_out, json.dumps(found.to_dict(), indent=2) + "\n")
    for line in found.report():
        typer.echo(line)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Folder for the data, runs and report."),
    fresh: bool = typer.Option(False, "--fresh", help="Replace the contents of --out if it is not empty."),
) -> None:
    """The whole job on synthetic phantoms, CPU, in minutes: pre-train, fine-tune (pre-trained and
    scratch; at once, each with half the threads, on 2 or more), predict the test cases, evaluate,
    and write report.md with plots and report.html with the test cases in a 3D viewer."""
    from swinssl.workflows.demo import run_demo

    with _user_errors():
        report = run_demo(out, fresh=fresh)
    typer.echo(report.read_text().split("## Evaluation summaries")[0].rstrip())
    typer.echo(f"\nreport: {report}\nin a browser: {report.with_name('report.html')}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A fine-tuning run directory (uses checkpoints/best.pt), checkpoint file, "
                                 "cross-validation folder (finetune.fold=all: the ensemble of its folds), or a "
                                 "predictor exported by swinssl export (.onnx or .pt2, run on the CPU)."),
    inputs: List[Path] = typer.Argument(..., help="Volume files, folders of volumes, dataset.json or nnU-Net folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the masks (<case_id>.nii.gz) and predictions.json."),
    ensemble: Optional[List[Path]] = typer.Option(None, "--ensemble", help="Another model (run, checkpoint, "
                                                  "cross-validation folder or exported file) to ensemble with MODEL; repeat for more. "
                                                  "The models' softmax probabilities are averaged; their plans must "
                                                  "match."),
    roi: Optional[int] = typer.Option(None, "--roi", help="Sliding-window size \\[default: the training crop]."),
    overlap: Optional[float] = typer.Option(None, "--overlap", min=0.0, max=0.99, help="Sliding-window overlap "
                                            "(Gaussian blending) \\[default: the fine-tuning's validation overlap, "
                                            "e.g. 0.7 for finetune/swinmm; 0.5 for older models]."),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size", min=1, help="Windows per forward pass "
                                                "\\[default: one per CPU thread, or what fits a quarter of the free "
                                                "GPU memory; at most 16]."),
    flips: bool = typer.Option(False, "--flips", help="Test-time augmentation: average over the 8 axis flips."),
    views: ViewsChoice = typer.Option("auto", "--views", help="single (the identity axis order), fused (softmax of "
                                      "the three axis orders averaged), one order (identity, swap_xy, swap_xz), or "
                                      "auto: fused for SwinMM multi-view models, else single."),
    output_format: OutputFormat = typer.Option("nifti", "--format", help="nifti, or 'same' to write NRRD for NRRD "
                                               "inputs."),
    device: Device = typer.Option("auto", "--device", help="cpu, cuda or auto (cpu for .onnx and .pt2 predictors)."),
    cache: str = typer.Option("auto", "--cache", help="Preprocessing cache folder; auto: the one the model was "
                              "trained with, if it still exists; off: preprocess every volume afresh."),
) -> None:
    """Segment volumes with a fine-tuned model; each mask lands in its input's exact geometry.

    Sliding-window inference on the preprocessed volume, then the preprocessing is inverted
    (foreground crop, resampling, reorientation), so every mask has its input's shape and
    affine. Files are written atomically; an unreadable input is reported and skipped.
    Preprocessed volumes are read from (and added to) the cache, so predicting the same
    volumes again skips decoding and resampling.

    An ensemble (a cross-validation folder, or --ensemble) averages the softmax probabilities of
    its models, each after its own sliding windows, flips and views, then takes the argmax, as
    the Swin UNETR and SwinFUSE papers ensemble their five folds.

    An exported predictor (swinssl export --out FILE.onnx or .pt2) predicts like its checkpoint:
    the plan in its metadata gives the preprocessing, classes and window size; its views choice
    is the one it was exported with (another --views or --roi is refused). ONNX files need
    onnxruntime (pip install "swinssl\\[onnx]"); .pt2 files holding pickled objects are refused.
    """
    import torch

    from swinssl.infer import PredictOptions, is_exported, predict as run

    if device == "auto":
        exported = any(is_exported(m) for m in [model, *(ensemble or [])])
        device = "cuda" if torch.cuda.is_available() and not exported else "cpu"
    options = PredictOptions(roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, flips=flips, views=views.value,
                             output_format=output_format, device=device, cache=cache)
    with _user_errors():
        written = run([model, *(ensemble or [])], inputs, out, options)
    typer.echo(f"wrote {len(written)} masks to {out}")


@app.command()
def evaluate(
    predictions: Path = typer.Argument(..., help="Folder of predicted masks named <case_id>.nii.gz (or .nrrd)."),
    labels: Path = typer.Argument(..., help="Folder of label files named <case_id>.*, or a dataset (dataset.json, "
                                  "nnU-Net raw folder) whose labelled cases are used."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where metrics.csv and summary.json go "
                                       "\\[default: the predictions folder]."),
    nsd_tolerance: float = typer.Option(1.0, "--nsd-tolerance", help="NSD tolerance in mm, all classes."),
    classes: Optional[List[int]] = typer.Option(None, "--class", help="Evaluate this class (repeat); default: every "
                                                "class in the labels."),
    split: Optional[Split] = typer.Option(None, "--split", help="Only this split of a dataset: training, validation "
                                        "or test."),
    html: bool = typer.Option(False, "--html", help="Also write report.html beside metrics.csv: a self-contained page "
                              "with a 3D viewer of image, label and prediction (see swinssl report)."),
) -> None:
    """Dice, HD95 (mm) and NSD per case and class, in physical spacing; a summary table per class.

    Empty cases have fixed values (both empty: Dice 1, HD95 0, NSD 1; one empty: Dice 0,
    NSD 0, HD95 the volume diagonal), so summaries never hold NaN. Each prediction must have
    its label's shape and affine.
    """
    from swinssl.metrics import evaluate as run, format_summary

    out = out or predictions
    with _user_errors():
        summary = run(predictions, labels, out_dir=out, classes=classes or None, nsd_tolerance=nsd_tolerance,
                      split=split)
    typer.echo(format_summary(summary))
    typer.echo(f"wrote {out / 'metrics.csv'} and {out / 'summary.json'}")
    if html:
        from swinssl.report import write_report

        with _user_errors():
            page = write_report(predictions, out / "report.html", labels=labels, evaluation=out)
        typer.echo(f"wrote {page}")


@app.command()
def report(
    path: Path = typer.Argument(..., help="A prediction folder (predictions.json), a training run, a cross-validation "
                                "folder, a study folder or the demo folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="The HTML file to write \\[default: PATH/report.html]."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="The dataset (dataset.json, nnU-Net raw folder) or "
                                          "folder of label files of a prediction folder's cases \\[default: the one "
                                          "its evaluation used]."),
    max_cases: int = typer.Option(12, "--max-cases", min=1, help="Cases the viewer holds (those with the lowest mean "
                                  "Dice); the table lists all."),
    max_side: int = typer.Option(192, "--max-side", min=16, help="Volumes longer than this along an axis are "
                                 "downsampled for display (the page says so)."),
) -> None:
    """One self-contained HTML page of results, opened from disk in any browser: no server, no network.

    A 3D viewer (NiiVue) per case: the image with label and prediction as overlays, the three
    planes and a 3D render, opacity and per-class visibility, the class legend and the case's
    Dice, HD95 and NSD. Then a sortable table of scores per case and class, training curves
    (losses, validation Dice, the probe), pre-training reconstruction previews, and each run's
    provenance (plan, config, versions, data manifest hash). Volumes are embedded compressed.
    For a prediction folder, labels and scores come from --labels or the evaluation beside it
    (swinssl evaluate; scores are computed when only --labels is given).
    """
    from swinssl.report import write_report

    with _user_errors():
        page = write_report(path, out, labels=labels, max_side=max_side, max_cases=max_cases)
    typer.echo(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB); open it in a browser")


@app.command()
def probe(
    model: str = typer.Argument(..., help="A pre-training run or any checkpoint load_pretrained reads, or 'random'."),
    data: Path = typer.Option(..., "--data", help="Labelled dataset (dataset.json, nnU-Net raw or labelled folder)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. preprocess.roi_size=64."),
    config: List[str] = typer.Option(["finetune/tiny"], "--config", "-c", help="Preset(s) for the data, crops and "
                                     "the network of 'random' (a checkpoint's plan fixes its own network)."),
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
    import dataclasses

    from swinssl.config import ModelConfig, from_dict, load_config
    from swinssl.engine.probe import probe as run, write_probe

    with _user_errors():
        cfg = load_config(config, [f"data={data}", *(overrides or [])])
        results = [run(model, cfg, steps=steps, seed=seed)]
        if model != "random":  # the baseline: a random encoder of the network the checkpoint's plan adopted
            network = from_dict(ModelConfig, results[0].network, source=str(model), prefix="model.")
            results.append(run("random", dataclasses.replace(cfg, model=network), steps=steps, seed=seed))
        path = write_probe(results, out)
    table = Table(title=f"frozen-encoder probe, {steps} steps, seed {seed}, held-out cases: "
                        f"{', '.join(results[0].test_cases)}")
    table.add_column("encoder")
    for name in results[0].per_class:
        table.add_column(f"Dice {name}")
    table.add_column("mean Dice")
    for r in results:
        table.add_row(r.source, *(f"{v:.3f}" for v in r.per_class.values()), f"{r.dice:.3f}")
    _console().print(table)
    typer.echo(f"wrote {path}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="A run directory (best.pt, else last.pt) or a swinssl checkpoint file."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write; its ending picks the format: .safetensors "
                             "(weights and plan), .onnx (an onnxruntime predictor) or .pt2 (a torch.export "
                             "predictor)."),
    views: ViewsChoice = typer.Option("auto", "--views", help=".onnx/.pt2: the views choice baked into the predictor "
                                      "(as predict's --views); auto: fused for SwinMM multi-view models, else single."),
) -> None:
    """Export a checkpoint: its weights and plan as .safetensors, or its predictor as .onnx or .pt2.

    .safetensors: the model weights and plan, no pickle inside, safe to share; predict,
    finetune.pretrained and load_pretrained read it like the checkpoint. Optimizer and RNG state
    stay behind, so a run cannot be resumed from it. Needs the safetensors package.

    .onnx / .pt2: the network of one sliding window (the fine-tuned checkpoint's, with the views
    choice baked in: SwinMM's fused views, SwinFUSE's domain-invariance module) for windows of
    the training crop, any number of windows per call, with the plan (preprocessing, classes,
    channels, window size) in the file's metadata. swinssl predict FILE runs it with the same
    preprocessing, sliding windows, flips and inversion as the checkpoint, on the CPU. ONNX
    files run in onnxruntime (pip install "swinssl\\[onnx]"; exporting a SwinMM network takes
    minutes); .pt2 files in PyTorch (torch.export).
    """
    from swinssl.errors import ConfigError

    suffix = out.suffix.lower()
    with _user_errors():
        if suffix == ".safetensors":
            if views.value != "auto":
                raise ConfigError("--views applies to .onnx and .pt2 predictors, not to .safetensors weights")
            from swinssl.engine.checkpoint import export_weights

            written = export_weights(model, out)
        elif suffix in (".onnx", ".pt2"):
            from swinssl.infer.export import export_predictor

            written = export_predictor(model, out, views.value)
        else:
            raise ConfigError(f"{out}: the name's ending picks the format: .safetensors (weights and plan), "
                              ".onnx (onnxruntime predictor) or .pt2 (torch.export predictor)")
    typer.echo(f"wrote {written}")


@contextlib.contextmanager
def _progress(total: int, what: str) -> Iterator:
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="vol", file=sys.stderr, disable=None, leave=False) as bar:
        yield lambda: bar.update(1)


@config_app.command("show")
def config_show(
    preset: Optional[str] = typer.Argument(None, help="A YAML file or preset name (see `swinssl config list`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. preprocess.roi_size=64."),
) -> None:
    """Print the resolved configuration (defaults, then preset, then overrides) as YAML."""
    import yaml

    from swinssl.config import load_config, to_dict

    if preset and "=" in preset:  # no preset, only overrides
        overrides, preset = [preset, *(overrides or [])], None
    with _user_errors():
        cfg = load_config(preset, overrides or [])
        from swinssl.methods import check_method_keys

        check_method_keys(cfg.method)  # as pre-training would refuse them
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())


@config_app.command("list")
def config_list() -> None:
    """List the presets shipped in configs/."""
    from swinssl.config import PRESET_DIR

    for path in sorted(PRESET_DIR.rglob("*.yaml")):
        typer.echo(str(path.relative_to(PRESET_DIR).with_suffix("")))


@study_app.command("data-efficiency")
def study_data_efficiency(
    config: str = typer.Option("pretrain/swin_unetr_tiny", "--config", "-c", help="Pre-training preset or YAML: its "
                               "method is the one studied (e.g. pretrain/swinmm_tiny)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled dataset with labelled test cases "
                                        "\\[default: phantoms written into OUT/data]."),
    out: Path = typer.Option(Path("runs/study_data_efficiency"), "--out", "-o", help="Folder for the runs and report."),
    preset: EfficiencyPreset = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 32 min per seed) "
                                            "or full (GPU)."),
    ratios: Optional[List[float]] = typer.Option(None, "--ratio", help="Label ratio (repeat) "
                                                 "\\[default: 0.1 0.3 0.5 1]."),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help="Seed (repeat) \\[default: the preset's]."),
    protocol: EfficiencyProtocol = typer.Option(
        "nested", "--protocol", help="nested: one fine-tuning per label ratio and init; semi (SwinMM Table 5): a "
        "multi-view base model on the labelled share, then continued from it with the other training cases "
        "pseudo-labelled (finetune.unlabeled=rest, their labels never read); both stages tested."),
) -> None:
    """Label efficiency (Swin UNETR Fig. 7, SwinMM Table 5): pre-train once, fine-tune from it and
    from scratch at each label ratio and seed, test all on the same held-out cases.

    Writes report.md (mean +- std Dice and HD95 per ratio and init, and per stage with --protocol
    semi), results.json and dice_vs_label_ratio.png; finished runs are reused when run again."""
    from swinssl.workflows.study import run_data_efficiency_study

    with _user_errors():
        report = run_data_efficiency_study(config, data, out, preset=preset.value, ratios=ratios or None,
                                           seeds=seeds or None, protocol=protocol.value)
    typer.echo(report.read_text())


@study_app.command("views")
def study_views(
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled dataset with labelled test cases "
                                        "\\[default: phantoms written into OUT/data]."),
    out: Path = typer.Option(Path("runs/study_views"), "--out", "-o", help="Folder for the runs and report."),
    preset: ViewsPreset = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 20 min) or full (GPU)."),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help="Seed (repeat) \\[default: the preset's]."),
    pretrained: str = typer.Option("", "--pretrained", help="Start both models from these weights (a pre-training "
                                   "run or checkpoint) \\[default: scratch]."),
) -> None:
    """Single views vs fused (SwinMM Table 3): fine-tune a SwinMM multi-view model and a plain
    SwinUNETR, test each through the identity, swap_xy and swap_xz axis orders and fused.

    Writes report.md (mean +- std Dice and HD95 per model and view), results.json and
    dice_by_view.png; finished runs are reused when run again."""
    from swinssl.workflows.study import run_views_study

    with _user_errors():
        report = run_views_study(data, out, preset=preset.value, seeds=seeds or None, pretrained=pretrained)
    typer.echo(report.read_text())


@study_app.command("modality")
def study_modality(
    out: Path = typer.Option(Path("runs/study_modality"), "--out", "-o", help="Folder for the data, runs and report."),
    preset: ModalityPreset = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 20 min) or full "
                                          "(GPU)."),
) -> None:
    """Out-of-modality transfer (SwinFUSE Table 2): pre-train Swin UNETR SSL and SwinFUSE on mixed
    CT + MRI phantoms, fine-tune each (and scratch) on CT and on MRI, test on both modalities.

    Finished stages are reused when run again; writes report.md and results.json."""
    from swinssl.workflows.study import run_modality_study

    with _user_errors():
        report = run_modality_study(out, preset=preset.value)
    typer.echo(report.read_text())


@nnunet_app.command("install")
def nnunet_install(
    uninstall: bool = typer.Option(False, "--uninstall", help="Remove what install wrote; nnU-Net's folder is then "
                                   "as it was."),
) -> None:
    """Make nnUNetTrainer_SwinUNETR (and _smoke) and the SwinsslNormalization scheme visible to nnU-Net.

    nnU-Net looks trainers and normalisation schemes up by class name only inside its own package
    folder, so this writes one small module into each of its two folders that imports the classes
    from swinssl. Idempotent; refuses an nnU-Net outside the tested range (nnunetv2 2.8.x).
    """
    from swinssl.nnunet.install import install, installed_names, uninstall as remove

    with _user_errors():
        done = remove() if uninstall else install()
    for path, what in done:
        typer.echo(f"{what}: {path}")
    if not uninstall:
        typer.echo(f"nnU-Net now finds {', '.join(installed_names())}")


@nnunet_app.command("plans")
def nnunet_plans(
    plans: Path = typer.Argument(..., help="nnU-Net's plans, e.g. $nnUNet_preprocessed/Dataset001_X/nnUNetPlans.json "
                                 "(dataset.json must be beside it)."),
    pretrained: Path = typer.Option(..., "--pretrained", help="The pre-training: a run directory or any checkpoint "
                                    "load_pretrained reads."),
    configuration: str = typer.Option("3d_fullres", "--configuration", "-c", help="The 3D configuration to train."),
    plans_name: str = typer.Option("nnUNetPlans_swinssl", "--plans-name", help="Name of the plans to write (nnU-Net's "
                                   "-p / -plans_name)."),
    keep_normalization: bool = typer.Option(False, "--keep-normalization", help="Keep nnU-Net's normalisation (needed "
                                            "for checkpoints without a swinssl plan)."),
) -> None:
    """Write plans (PLANS_NAME.json beside PLANS) for nnUNetTrainer_SwinUNETR from a pre-training.

    The plans hold the one configuration, with the pre-trained network's architecture and the
    pre-training's intensity normalisation (SwinsslNormalization: the CT HU window scaled to [0, 1],
    or the MRI percentile / z-score scaling, per channel by its dataset.json name), in a
    preprocessed-data folder of their own. Refuses an encoder pre-trained on another modality than
    a channel's, and a checkpoint without a swinssl plan unless --keep-normalization. Then run
    nnUNetv2_preprocess -d ID -plans_name PLANS_NAME -c CONFIGURATION.
    """
    from swinssl.nnunet.plans import write_swinssl_plans

    with _user_errors():
        written, said = write_swinssl_plans(plans, pretrained, configuration, plans_name, keep_normalization)
    for line in said:
        typer.echo(line)
    typer.echo(f"wrote {written}")


@nnunet_app.command("export")
def nnunet_export(
    model: Path = typer.Argument(..., help="The pre-training: a run directory or any checkpoint load_pretrained reads."),
    plans: Path = typer.Option(..., "--plans", help="The plans written by swinssl nnunet plans."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write, for nnUNetv2_train -pretrained_weights."),
    configuration: str = typer.Option("3d_fullres", "--configuration", "-c", help="The configuration to train."),
) -> None:
    """Write MODEL's weights as a file nnU-Net's -pretrained_weights loads into nnUNetTrainer_SwinUNETR.

    Loads MODEL with swinssl's loader into the network the trainer builds for PLANS (a 1-channel
    stem adapted to the dataset's channels) and prints what loaded; refuses one where no encoder
    tensor loads, or of another feature size or modality than the plans and dataset.
    """
    from swinssl.nnunet.export import export_for_nnunet

    with _user_errors():
        written, report = export_for_nnunet(model, plans, out, configuration)
    typer.echo(report.summary())
    if report.missing:
        typer.echo(f"  {len(report.missing)} tensors not in the checkpoint (e.g. a pre-training's decoder) keep the "
                   "network's fresh initialisation")
    for key in report.adapted:
        typer.echo(f"  channel-adapted: {key}")
    for key in report.mismatched:
        typer.echo(f"  shape-mismatched (initialised afresh): {key}")
    typer.echo(f"wrote {written}")


def _flow(doc: Optional[str]) -> Optional[str]:
    """A docstring with each paragraph on one line: rich keeps the line breaks of a command's help
    after its first paragraph, so hand-wrapped docstrings would break mid-sentence in ``--help``."""
    if doc is None:
        return None
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


for _typer in (app, data_app, config_app, study_app, nnunet_app):
    for _command in _typer.registered_commands:
        _command.callback.__doc__ = _flow(_command.callback.__doc__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
