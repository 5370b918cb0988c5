"""nnU-Net bridge commands: install the trainer, write its plans, export weights for it."""

from __future__ import annotations

from pathlib import Path

import typer

from swinssl.cli.common import nnunet_app, user_errors


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

    with user_errors():
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

    with user_errors():
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

    with user_errors():
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
