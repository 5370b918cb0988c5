"""``swinssl nnunet install``: make swinssl's trainer and normalisation visible to nnU-Net.

nnU-Net v2 looks a trainer (``-tr NAME``) up by class name among the modules of its own
``nnunetv2/training/nnUNetTrainer`` folder, and a plans file's normalisation scheme among those
of ``nnunetv2/preprocessing/normalization``. So installing is writing one small module into each
folder (``SHIMS``) that only imports the classes from swinssl. Each shim starts with ``MARKER``:
uninstalling removes only files carrying it (and their bytecode), leaving the folder as it was;
installing never overwrites a file without it.

nnU-Net itself is not imported here (``importlib.util.find_spec`` finds its folder), so the
command is quick and works where importing nnU-Net would fail.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from swinssl.errors import DependencyError
from swinssl.nnunet import TESTED_NNUNET, TESTED_RANGE
from swinssl.utils import atomic_write_text

MARKER = "# Written by `swinssl nnunet install`; `swinssl nnunet install --uninstall` removes it."


@dataclass(frozen=True)
class Shim:
    folder: str  # inside nnU-Net's package folder, where nnU-Net searches by class name
    module: str  # the swinssl module the classes come from
    names: tuple[str, ...]

    @property
    def file(self) -> str:
        return f"{self.folder}/swinssl_{self.module.rsplit('.', 1)[-1]}.py"


SHIMS = (
    Shim("training/nnUNetTrainer", "swinssl.nnunet.trainer",
         ("nnUNetTrainer_SwinUNETR", "nnUNetTrainer_SwinUNETR_smoke", "nnUNetTrainer_short")),
    Shim("preprocessing/normalization", "swinssl.nnunet.normalization", ("SwinsslNormalization",)),
)


def shim_text(shim: Shim) -> str:
    """The module written into nnU-Net's folder: an import, tolerant of swinssl having been removed
    without uninstalling (nnU-Net imports every module of the folder when it looks a name up)."""
    names = ", ".join(shim.names)
    return (f"{MARKER}\n"
            "# nnU-Net finds these classes by name only inside its own package; they live in swinssl.\n"
            "try:\n"
            f"    from {shim.module} import {names}  # noqa: F401\n"
            "except ModuleNotFoundError as err:\n"
            "    if (err.name or '').split('.')[0] != 'swinssl':\n"
            "        raise\n")


def check_nnunet_version(version: str) -> None:
    """Refuse an nnU-Net outside the tested range (its trainer and plans interfaces change between
    minor versions)."""
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor != TESTED_NNUNET:
        tested = ".".join(map(str, TESTED_NNUNET))
        raise DependencyError(f"nnU-Net (nnunetv2) {version} is installed; swinssl's nnU-Net bridge is tested with "
                              f"nnunetv2 {tested}.x (pip install 'nnunetv2{TESTED_RANGE}', or 'swinssl[nnunet]')")


def installed_nnunet() -> tuple[Path, str]:
    """nnU-Net's package folder and version, without importing it."""
    spec = importlib.util.find_spec("nnunetv2")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"nnU-Net (nnunetv2) is not installed: pip install 'swinssl[nnunet]' "
                              f"(nnunetv2{TESTED_RANGE})")
    return Path(list(spec.submodule_search_locations)[0]), importlib.metadata.version("nnunetv2")


def nnunet_folder() -> Path:
    """nnU-Net's package folder, once its version is checked."""
    folder, version = installed_nnunet()
    check_nnunet_version(version)
    return folder


def install(folder: Path | None = None) -> list[tuple[Path, str]]:
    """Write the shims into nnU-Net's ``folder`` (default: the installed one); returns each file
    with ``wrote`` or ``unchanged``. Idempotent; refuses to overwrite a file swinssl did not write."""
    folder = nnunet_folder() if folder is None else Path(folder)
    done = []
    for shim in SHIMS:
        path, text = folder / shim.file, shim_text(shim)
        if not path.parent.is_dir():
            raise DependencyError(f"{path.parent}: not found; is {folder} nnU-Net v2's package folder?")
        if path.is_file():
            current = path.read_text(encoding="utf-8", errors="replace")
            if not current.startswith(MARKER):
                raise DependencyError(f"{path}: exists and was not written by swinssl; not overwriting it")
            if current == text:
                done.append((path, "unchanged"))
                continue
        atomic_write_text(path, text)
        done.append((path, "wrote"))
    return done


def uninstall(folder: Path | None = None) -> list[tuple[Path, str]]:
    """Remove the shims (and their bytecode) from nnU-Net's ``folder``; returns each file with
    ``removed``, ``absent`` or ``kept`` (a file of that name that swinssl did not write)."""
    if folder is None:
        folder, _ = installed_nnunet()  # any version: removing is always allowed
    done = []
    for shim in SHIMS:
        path = Path(folder) / shim.file
        if not path.is_file():
            done.append((path, "absent"))
            continue
        if not path.read_text(encoding="utf-8", errors="replace").startswith(MARKER):
            done.append((path, "kept"))
            continue
        path.unlink()
        for compiled in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
            compiled.unlink()
        done.append((path, "removed"))
    return done


def installed_names() -> tuple[str, ...]:
    """Every class name the shims make visible (for messages)."""
    return tuple(name for shim in SHIMS for name in shim.names)
