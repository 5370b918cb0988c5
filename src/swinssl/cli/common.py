"""What every command group shares: the typer apps, errors as one line, the console, progress."""

from __future__ import annotations

import contextlib
import shutil
import sys
import traceback
from typing import Iterator, Literal

import typer
from rich.console import Console

from swinssl.errors import SwinsslError

app = typer.Typer(
    name="swinssl",
    help="Self-supervised pre-training and fine-tuning of 3D Swin transformers for CT and MRI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets and prepare their preprocessing cache.", no_args_is_help=True)
config_app = typer.Typer(help="Show configurations and presets.", no_args_is_help=True)
study_app = typer.Typer(help="Check the papers' claims on small data, one command per study.", no_args_is_help=True)
nnunet_app = typer.Typer(help="Fine-tune a swinssl pre-trained encoder inside nnU-Net v2 (pip install 'swinssl\\[nnunet]').",
                         no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(study_app, name="study")
app.add_typer(nnunet_app, name="nnunet")
APPS = (app, data_app, config_app, study_app, nnunet_app)

Modality = Literal["CT", "MRI", "auto"]
PRESETS_HELP = "Preset name (swinssl config list) or YAML file; repeat to lay presets over one another"
VIEWS_HELP = ("the views choice of the model's method: auto (fused for SwinMM multi-view models, else single), "
              "single, fused (the axis orders' softmax averaged) or one axis order; an unknown choice is refused "
              "with the registered ones")

debug = False  # --debug: errors keep their traceback


def console(stderr: bool = False) -> Console:
    width = shutil.get_terminal_size((200, 24)).columns if sys.stdout.isatty() else 200
    return Console(width=width, stderr=stderr, highlight=False)


def say(text: str) -> None:
    """A progress line on stderr (stdout carries the results)."""
    typer.echo(text, err=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report a ``SwinsslError`` as one line on stderr and exit with its code (``--debug``: the
    traceback first, a data worker's included)."""
    try:
        yield
    except SwinsslError as err:
        if debug:
            typer.echo(traceback.format_exc() + err.worker_traceback, err=True)
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(err.exit_code) from None
    except OSError as err:  # unwritable output folder, full disk, ...
        where = err.filename or "output"
        typer.echo(f"error: {where}: {err.strerror or err}", err=True)
        raise typer.Exit(3) from None


@contextlib.contextmanager
def progress(total: int, what: str) -> Iterator:
    from tqdm import tqdm

    with tqdm(total=total, desc=what, unit="vol", file=sys.stderr, disable=None, leave=False) as bar:
        yield lambda: bar.update(1)
