"""Study commands: each checks one of the papers' claims on small data (``swinssl.workflows.study``)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from swinssl.cli.common import study_app, user_errors

DATA = typer.Option(None, "--data", help="Labelled dataset with labelled test cases \\[default: phantoms written "
                    "into OUT/data].")


@study_app.command("data-efficiency")
def data_efficiency(
    config: str = typer.Option("pretrain/swin_unetr_tiny", "--config", "-c", help="Pre-training preset or YAML: its "
                               "method is the one studied (e.g. pretrain/swinmm_tiny)."),
    data: Optional[Path] = DATA,
    out: Path = typer.Option(Path("runs/study_data_efficiency"), "--out", "-o", help="Folder for the runs and report."),
    preset: str = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 32 min per seed) or full (GPU)."),
    ratios: Optional[List[float]] = typer.Option(None, "--ratio", help="Label ratio (repeat) "
                                                 "\\[default: 0.1 0.3 0.5 1]."),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help="Seed (repeat) \\[default: the preset's]."),
    protocol: str = typer.Option(
        "nested", "--protocol", help="nested: one fine-tuning per label ratio and init; semi (SwinMM Table 5): a "
        "multi-view base model on the labelled share, then continued from it with the other training cases "
        "pseudo-labelled (finetune.unlabeled=rest, their labels never read); both stages tested."),
) -> None:
    """Label efficiency (Swin UNETR Fig. 7, SwinMM Table 5): pre-train once, fine-tune from it and
    from scratch at each label ratio and seed, test all on the same held-out cases.

    Writes report.md (mean +- std Dice and HD95 per ratio and init, and per stage with --protocol
    semi), results.json and dice_vs_label_ratio.png; finished runs are reused when run again."""
    from swinssl.workflows.study import run_data_efficiency_study

    with user_errors():
        report = run_data_efficiency_study(config, data, out, preset=preset, ratios=ratios or None,
                                           seeds=seeds or None, protocol=protocol)
    typer.echo(report.read_text())


@study_app.command("views")
def views(
    data: Optional[Path] = DATA,
    out: Path = typer.Option(Path("runs/study_views"), "--out", "-o", help="Folder for the runs and report."),
    preset: str = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 20 min) or full (GPU)."),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help="Seed (repeat) \\[default: the preset's]."),
    pretrained: str = typer.Option("", "--pretrained", help="Start both models from these weights (a pre-training "
                                   "run or checkpoint) \\[default: scratch]."),
) -> None:
    """Single views vs fused (SwinMM Table 3): fine-tune a SwinMM multi-view model and a plain
    SwinUNETR, test each through the identity, swap_xy and swap_xz axis orders and fused.

    Writes report.md (mean +- std Dice and HD95 per model and view), results.json and
    dice_by_view.png; finished runs are reused when run again."""
    from swinssl.workflows.study import run_views_study

    with user_errors():
        report = run_views_study(data, out, preset=preset, seeds=seeds or None, pretrained=pretrained)
    typer.echo(report.read_text())


@study_app.command("modality")
def modality(
    out: Path = typer.Option(Path("runs/study_modality"), "--out", "-o", help="Folder for the data, runs and report."),
    preset: str = typer.Option("tiny", "--preset", help="Study size: tiny (CPU, about 20 min) or full (GPU)."),
) -> None:
    """Out-of-modality transfer (SwinFUSE Table 2): pre-train Swin UNETR SSL and SwinFUSE on mixed
    CT + MRI phantoms, fine-tune each (and scratch) on CT and on MRI, test on both modalities.

    Finished stages are reused when run again; writes report.md and results.json."""
    from swinssl.workflows.study import run_modality_study

    with user_errors():
        report = run_modality_study(out, preset=preset)
    typer.echo(report.read_text())


@study_app.command("benchmark")
def benchmark(
    data: Optional[List[str]] = typer.Option(None, "--data", help="A labelled dataset with labelled test cases, "
                                             "tagged dev (default) or test: PATH, dev:PATH or test:PATH (repeat) "
                                             "\\[default: phantoms written into OUT/data, dev]."),
    pretrained: Optional[List[str]] = typer.Option(None, "--pretrained", help="A pre-training run or checkpoint "
                                                   "to fine-tune from, one arm each: RUN or NAME=RUN (repeat)."),
    out: Path = typer.Option(Path("runs/study_benchmark"), "--out", "-o", help="Folder for the runs and report."),
    preset: str = typer.Option("tiny", "--preset", help="Study size: tiny (CPU) or full (GPU, nnU-Net's own "
                               "1000-epoch schedule)."),
    fractions: Optional[List[float]] = typer.Option(None, "--fraction", help="Label fraction of the training cases "
                                                    "(repeat) \\[default: the preset's]."),
    seeds: Optional[List[int]] = typer.Option(None, "--seed", help="Seed (repeat) \\[default: the preset's]."),
    nnunet: bool = typer.Option(True, "--nnunet/--no-nnunet", help="The nnU-Net arm (needs the swinssl\\[nnunet] "
                                "extra: make install-nnunet)."),
) -> None:
    """Pre-trained Swin vs scratch vs nnU-Net on your data (OpenMind / Spark3D / Touchstone protocol).

    Per dataset, label fraction and seed, every arm trains on the same cases and is tested on the
    same test cases, scored by swinssl evaluate: scratch, one arm per --pretrained, and nnU-Net v2's
    own plans, network and trainer. Pairwise paired tests with Holm's correction per dataset and
    fraction, mean ranks (dev and test datasets apart), significance maps, device-hours. Writes
    report.md, results.json, cases.csv and significance_*.png; swinssl report OUT renders them.
    Finished units are reused when run again (a stopped study resumes)."""
    from swinssl.workflows.benchmark import run_benchmark_study

    with user_errors():
        report = run_benchmark_study(data or [], pretrained or [], out, preset=preset, fractions=fractions or None,
                                     seeds=seeds or None, nnunet=nnunet)
    typer.echo(report.read_text())
