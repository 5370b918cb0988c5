"""Commands on fine-tuned models and their outputs: predict, evaluate, report, export."""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from swinssl.cli.common import VIEWS_HELP, app, user_errors


@app.command()
def predict(
    model: Path = typer.Argument(..., help="A fine-tuning run directory (uses checkpoints/best.pt), checkpoint file, "
                                 "cross-validation folder (finetune.fold=all: the ensemble of its folds), or a "
                                 "predictor exported by swinssl export (.onnx or .pt2, run on the CPU)."),
    inputs: List[Path] = typer.Argument(..., help="Volume files, folders of volumes, dataset.json or nnU-Net folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the masks (<case_id>.nii.gz) and predictions.json."),
    ensemble: Optional[List[Path]] = typer.Option(None, "--ensemble", help="Another model (run, checkpoint, "
                                                  "cross-validation folder or exported file) to ensemble with MODEL; "
                                                  "repeat for more. The models' softmax probabilities are averaged; "
                                                  "their plans must match."),
    roi: Optional[int] = typer.Option(None, "--roi", help="Sliding-window size \\[default: the training crop]."),
    overlap: Optional[float] = typer.Option(None, "--overlap", min=0.0, max=0.99, help="Sliding-window overlap "
                                            "(Gaussian blending) \\[default: the fine-tuning's validation overlap, "
                                            "e.g. 0.7 for finetune/swinmm; 0.5 for older models]."),
    sw_batch_size: Optional[int] = typer.Option(None, "--sw-batch-size", min=1, help="Windows per forward pass "
                                                "\\[default: one per CPU thread, or what fits a quarter of the free "
                                                "GPU memory; at most 16]."),
    flips: bool = typer.Option(False, "--flips", help="Test-time augmentation: average over the 8 axis flips."),
    views: str = typer.Option("auto", "--views", help=f"{VIEWS_HELP}."),
    output_format: Literal["nifti", "same"] = typer.Option("nifti", "--format", help="nifti, or 'same' to write NRRD "
                                                           "for NRRD inputs."),
    device: Literal["auto", "cpu", "cuda"] = typer.Option("auto", "--device", help="cpu, cuda or auto (cpu for .onnx "
                                                          "and .pt2 predictors)."),
    cache: str = typer.Option("auto", "--cache", help="Preprocessing cache folder; auto: the one the model was "
                              "trained with, if it still exists; off: preprocess every volume afresh."),
    part: Optional[str] = typer.Option(None, "--part", metavar="I/N", help="Predict only part I of N (0 <= I < N): "
                                       "the cases in name order, every N-th from the I-th. N processes, GPUs or "
                                       "machines given the same inputs and --out split them (e.g. a SLURM array, "
                                       "--part $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Predict again the cases whose mask this model and "
                                   "these options already wrote to --out (by default they are skipped, so a stopped "
                                   "run resumes)."),
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

    An archive: a run resumes by default, skipping each case whose mask --out already holds
    from the same model files and options (window size, overlap, flips, views, format; not the
    window batch, device or cache), and says how many; a case whose mask was being written when
    a run stopped, or was made by another model, is predicted again (--overwrite: all). --part
    I/N splits the inputs between N processes writing into one --out, whose predictions.json
    lists every case predicted so far. Where the network leaves cores idle (a
    GPU, or fewer intra-op threads than cores, e.g. OMP_NUM_THREADS=1 beside other parts), reading
    the next case and writing the last one run in threads beside the network on the current one.
    """
    from swinssl.infer import PredictOptions, predict as run
    from swinssl.infer.cases import parse_part

    options = PredictOptions(roi_size=roi, overlap=overlap, sw_batch_size=sw_batch_size, flips=flips, views=views,
                             output_format=output_format, device=device, cache=cache)
    with user_errors():
        archive: dict = {}  # only what was asked for: predict's defaults are the whole list, resumed
        if part is not None:
            archive["part"] = parse_part(part)
        if overwrite:
            archive["overwrite"] = True
        masks = run([model, *(ensemble or [])], inputs, out, options, **archive)
    typer.echo(f"{len(masks)} masks in {out}")


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
    split: Optional[Literal["training", "validation", "test"]] = typer.Option(
        None, "--split", help="Only this split of a dataset: training, validation or test."),
    html: bool = typer.Option(False, "--html", help="Also write report.html beside metrics.csv: a self-contained page "
                              "with a 3D viewer of image, label and prediction (see swinssl report)."),
) -> None:
    """Dice, HD95 (mm) and NSD per case and class, in physical spacing; a summary table per class.

    Empty cases have fixed values (both empty: Dice 1, HD95 0, NSD 1; one empty: Dice 0,
    NSD 0, HD95 the volume diagonal), so summaries never hold NaN. Each prediction must have
    its label's shape and affine.
    """
    from swinssl.metrics import evaluate as run, format_summary
    from swinssl.results import EvaluationFolder

    out = out or predictions
    with user_errors():
        summary = run(predictions, labels, out_dir=out, classes=classes or None, nsd_tolerance=nsd_tolerance,
                      split=split)
    typer.echo(format_summary(summary))
    typer.echo(f"wrote {EvaluationFolder(out).metrics} and {EvaluationFolder(out).summary}")
    if html:
        from swinssl.report import write_report

        with user_errors():
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

    with user_errors():
        page = write_report(path, out, labels=labels, max_side=max_side, max_cases=max_cases)
    typer.echo(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB); open it in a browser")


@app.command()
def export(
    model: Path = typer.Argument(..., help="A run directory (best.pt, else last.pt) or a swinssl checkpoint file."),
    out: Path = typer.Option(..., "--out", "-o", help="The file to write; its ending picks the format: .safetensors "
                             "(weights and plan), .onnx (an onnxruntime predictor) or .pt2 (a torch.export "
                             "predictor)."),
    views: str = typer.Option("auto", "--views", help=f".onnx/.pt2: the views choice baked into the predictor: "
                              f"{VIEWS_HELP}."),
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
    from swinssl.infer.export import export as run

    with user_errors():
        written = run(model, out, views)
    typer.echo(f"wrote {written}")
