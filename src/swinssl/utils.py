"""Small helpers shared across the package."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def writable_dir(path: str | Path) -> Path:
    """Create folder ``path`` if needed and prove a file can be written in it: an unwritable
    output fails in a second, before hours of training or inference."""
    from swinssl.errors import OutputError

    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputError(f"{path}: cannot write output here ({err.strerror or err})") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash or an exception leaves ``path`` as it was (old content or absent) and
    removes the temporary file. ``suffix`` keeps the extension writers look at
    (e.g. ``.nii.gz`` so nibabel compresses).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def count_windows(shape, roi, overlap: float) -> int:
    """Sliding windows of ``roi`` over ``shape`` at ``overlap``, tiled as MONAI's ``sliding_window_inference``:
    the image padded up to the ROI, a step of ``int(roi x (1 - overlap))`` (at least 1; a whole side when
    the ROI equals it), the last window moved back inside the image."""
    total = 1
    for size, side in zip(shape, roi):
        size = max(int(size), int(side))
        if size == side:
            continue
        step = max(int(side * (1 - overlap)), 1)
        total *= math.ceil((size - side) / step) + 1
    return total


@dataclass(frozen=True)
class Folder:
    """A folder whose files one owner names (``runs.RunDir``, ``results.PredictionFolder``, ...); ``~`` expanded."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())
