"""Data and configuration commands: phantom, data check, data prepare, config show, config list."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from swinssl.cli.common import Modality, app, config_app, console, data_app, progress, user_errors


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

    with user_errors():
        dataset_json = write_phantom_dataset(out, cases=cases, size=size, seed=seed, test_fraction=test_fraction)
    typer.echo(f"wrote {cases} phantom cases ({size}^3, CT + MRI) to {out}; dataset files: {dataset_json} and "
               f"{dataset_json.with_name('dataset_mri.json')}")


@data_app.command("check")
def data_check(
    path: Path = typer.Argument(..., help="A folder of volumes, a dataset.json (MSD or nnU-Net), or an nnU-Net raw folder."),
    modality: Modality = typer.Option("auto", "--modality", help="CT, MRI, or auto (folder names, then intensities)."),
    cache: str = typer.Option("runs/cache", "--cache", help="The cache folder whose checks/ remembers each case's "
                              "result by its files' size and mtime (off: read every volume)."),
) -> None:
    """Read every volume and list file, modality, shape, spacing, orientation, intensities and label classes.

    Exits with 1 and one line per problem when a volume is unreadable or inconsistent. A case
    whose files have not changed since it was last checked is not read again (--cache).
    """
    from swinssl.data.check import check_dataset
    from swinssl.data.discover import find_dataset

    with user_errors():
        dataset = find_dataset(path, modality=modality)
    with progress(len(dataset.cases), "reading") as tick:
        reports, problems = check_dataset(dataset, progress=tick, memo=None if cache == "off" else Path(cache) / "checks")
    table = Table(title=f"{dataset.root} ({dataset.layout} layout, {len(dataset.cases)} volumes)")
    for column in ("file", "modality", "shape", "spacing (mm)", "orientation", "intensity range", "label classes"):
        table.add_column(column, overflow="fold")
    for r in reports:
        table.add_row(r.file, r.modality, "x".join(map(str, r.shape)), "x".join(f"{s:.3g}" for s in r.spacing),
                      r.orientation, f"{r.intensity[0]:.4g} .. {r.intensity[1]:.4g}",
                      "-" if r.label_classes is None else ",".join(map(str, r.label_classes)))
    console().print(table)
    if dataset.labels:
        typer.echo("declared classes: " + ", ".join(f"{k}={v}" for k, v in sorted(dataset.labels.items())))
    for line in (line for r in reports for line in r.warnings):
        typer.echo(f"warning: {line}", err=True)
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    if problems:
        typer.echo(f"{len(problems)} of {len(dataset.cases)} volumes have problems", err=True)
        raise typer.Exit(1)
    doubtful = len({r.file for r in reports if r.warnings})
    typer.echo(f"all {len(reports)} volumes readable and consistent"
               + (f"; {doubtful} with warnings above" if doubtful else ""))


@data_app.command("prepare")
def data_prepare(
    config: Optional[str] = typer.Argument(None, help="A preset name or YAML file, as --config of pretrain / finetune "
                                           "takes (a run's config.yaml too) \\[default: pretrain/swin_unetr_tiny; "
                                           "finetune/tiny with --stage finetune]."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. data=PATH "
                                                    "data.cache=FOLDER data.cache_dtype=float16."),
    stage: str = typer.Option("pretrain", "--stage", help="pretrain: the images of the training and validation "
                              "cases; finetune: the labelled cases with their labels."),
    workers: int = typer.Option(1, "--workers", help="Processes preparing volumes at once (nnU-Net's -np)."),
) -> None:
    """Preprocess every volume a stage trains on into the preprocessing cache, before training.

    Runs the stage's deterministic head (read and check, reorientation, resampling, normalisation,
    foreground crop) once per volume into data.cache (<train.out>/cache by default, where training
    and prediction look), --workers processes at a time, with a progress bar (volumes/s, time left).
    Resumable: volumes already cached are skipped unread, and a killed prepare loses only the
    volumes in flight. A bad volume (unreadable, truncated, NaN, not 3D) is recorded in the cache
    with its one-line reason, which training and prediction read to skip it, and listed in the
    report <cache>/prepare/<stage>.txt (and .json); the others go on. Processes on several machines
    sharing the cache folder split the work: no entry is built twice.
    """
    from swinssl.config import load_config
    from swinssl.data.prepare import prepare

    if config and "=" in config:  # no preset, only overrides
        overrides, config = [config, *(overrides or [])], None
    with user_errors():
        preset = config or ("finetune/tiny" if stage == "finetune" else "pretrain/swin_unetr_tiny")
        cfg = load_config(preset, overrides or [])
        if stage == "finetune" and cfg.finetune.pretrained:
            cfg = _as_finetuning_reads(cfg)
        summary = prepare(cfg, stage=stage, workers=workers, progress=True)
    for line in summary.lines():
        typer.echo(line)


def _as_finetuning_reads(cfg):
    """``cfg`` with what fine-tuning adopts from ``finetune.pretrained``'s plan (network input channels,
    orientation, spacing, normalisation), so that prepare builds the entries the fine-tuning reads."""
    from swinssl.checkpoint import read_head
    from swinssl.plan import adopt_architecture, adopt_input, architecture_of, input_of
    from swinssl.runs import resolve_checkpoint

    source = cfg.finetune.pretrained
    plan = read_head(resolve_checkpoint(source, prefer_best=False)).plan
    cfg.model = adopt_architecture(cfg.model, architecture_of(plan, source), source)
    pretrained_input, _ = input_of(plan, source)
    cfg.preprocess = adopt_input(cfg.preprocess, pretrained_input, source, cfg.finetune.adopt_preprocessing)
    return cfg


@config_app.command("show")
def config_show(
    preset: Optional[str] = typer.Argument(None, help="A YAML file or preset name (see `swinssl config list`)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. preprocess.roi_size=64."),
) -> None:
    """Print the resolved configuration (defaults, then preset, then overrides) as YAML."""
    from swinssl.config import load_config, to_yaml
    from swinssl.methods import check_method_keys

    if preset and "=" in preset:  # no preset, only overrides
        overrides, preset = [preset, *(overrides or [])], None
    with user_errors():
        cfg = load_config(preset, overrides or [])
        check_method_keys(cfg.method)  # as pre-training would refuse them
    typer.echo(to_yaml(cfg).rstrip())


@config_app.command("list")
def config_list() -> None:
    """List the presets shipped in configs/ (the names --config takes)."""
    from swinssl.config import preset_names

    for name in preset_names():
        typer.echo(name)
