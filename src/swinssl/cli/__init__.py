"""The ``swinssl`` command line, one module per command group; each command parses its options and
calls one library function.

Exit codes: 0 success; 1 ``data check`` found problems; 2 usage, config or environment error
(e.g. an nnU-Net version the bridge was not tested with);
3 a data or checkpoint error stopped the command (the message names the file);
4 training stopped (non-finite loss or gradients, a checkpoint that cannot be written, a
failed process of a distributed run; the last good checkpoint is kept); 5 an output folder
cannot be written (checked before the work starts).
"""

from __future__ import annotations

import inspect

import typer

import swinssl
# Each registers its commands; in this order, --help lists them as a job runs: data, training, prediction.
from swinssl.cli import common, data, train, predict, study, nnunet  # noqa: F401, I001
from swinssl.cli.common import APPS, app


def _version(value: bool) -> None:
    if value:
        typer.echo(f"swinssl {swinssl.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Print the traceback of an error, not only its one line."),
) -> None:
    common.debug = debug


def _flow(doc: str | None) -> str | None:
    """A docstring with each paragraph on one line: rich keeps the line breaks of a command's help
    after its first paragraph, so hand-wrapped docstrings would break mid-sentence in ``--help``."""
    if doc is None:
        return None
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


for _typer in APPS:
    for _command in _typer.registered_commands:
        _command.callback.__doc__ = _flow(_command.callback.__doc__)


def main() -> None:
    app()


__all__ = ["app", "main"]
