"""On-disk cache of preprocessed volumes: decode, reorient, resample and normalise once.

The deterministic head of every training pipeline (read + check, orientation, spacing,
intensity normalisation, foreground crop) costs seconds per volume; random crops of the
result cost milliseconds. ``CachedPrefixd`` runs that head once per volume and stores its
output as ``.npy`` arrays; later visits read the arrays instead, memory-mapped for
pre-training so that a crop reads only its own voxels.

An entry's key is the SHA-256 of (the source files' SHA-256s, the item's declared
modality, the preprocessing settings the head uses, the cache format version, the MONAI
version). So an entry is rebuilt when a file's content or a setting changes, and stale
entries are never read (they stay on disk until the cache folder is removed). A file's
checksum is remembered next to the entries by (path, size, mtime), so unchanged files are
hashed once, not once per run.

Layout (``root`` is ``data.cache``, by default ``<train.out>/cache``)::

    root/entries/<key>/image.npy, label.npy (when labelled), meta.json
    root/checksums/<sha1 of the source path>.json

Entries are written to a temporary folder and renamed into place, so a killed run never
leaves a half-written entry; two processes building the same entry both succeed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Hashable, Mapping

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform

from swinssl.config import PreprocessConfig
from swinssl.utils import atomic_write_text, sha256_file

CACHE_FORMAT = 1
# Settings of the random tail (crop size and count, augmentation), not of the cached head.
TAIL_FIELDS = ("roi_size", "num_crops", "pos_fraction", "augment")

log = logging.getLogger(__name__)


def settings_fingerprint(cfg: PreprocessConfig, **extra: Any) -> dict[str, Any]:
    """What the cached head depends on besides the files: preprocessing settings (without the
    random tail's), the reader's expectations (``extra``: channels, classes...), versions."""
    settings = {k: v for k, v in vars(cfg).items() if k not in TAIL_FIELDS}
    return {"format": CACHE_FORMAT, "monai": monai.__version__, **settings, **extra}


def _files_of(path: Path) -> list[Path]:
    """The files a source consists of: itself, or every file of a DICOM series folder."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def file_checksum(path: Path, index: Path | None = None) -> str:
    """SHA-256 of a file's bytes, remembered in ``index`` by (resolved path, size, mtime_ns)."""
    stat = path.stat()
    stamp = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = index / f"{hashlib.sha1(stamp['path'].encode()).hexdigest()}.json" if index else None
    if memo is not None and memo.is_file():
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in stamp} == stamp:
                return saved["sha256"]
        except (OSError, ValueError, KeyError):
            pass  # an unreadable memo is recomputed
    digest = sha256_file(path)
    if memo is not None:
        atomic_write_text(memo, json.dumps({**stamp, "sha256": digest}))
    return digest


def source_checksum(path: str | Path, index: Path | None = None) -> str:
    """Checksum of one source (a file, or a DICOM folder as the checksums of its files in order)."""
    files = _files_of(Path(path))
    if len(files) == 1 and files[0] == Path(path):
        return file_checksum(files[0], index)
    combined = hashlib.sha256()
    for f in files:
        combined.update(f.relative_to(path).as_posix().encode() + b"\0" + file_checksum(f, index).encode())
    return combined.hexdigest()


def _compact_label(label: np.ndarray) -> np.ndarray:
    """Class indices in the smallest exact integer type (labels arrive as float32)."""
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if label.size == 0 or (label.min() >= info.min and label.max() <= info.max):
            return label.astype(dtype)
    return label


class CachedPrefixd(MapTransform):
    """Run ``head`` (a deterministic pipeline) through the cache at ``root``.

    The result holds ``image`` (and ``label`` when the head produced one) with the head's
    values bit for bit, plus the head's ``modality``. ``mmap``: the image comes back as a
    read-only memory-mapped ``(C, X, Y, Z)`` array (crop it with ``RandCropsd``); otherwise
    as a MetaTensor with the head's affine (labels restored to the head's dtype).
    An unwritable ``root`` is reported once and the head runs uncached.
    """

    def __init__(self, head: Compose, root: str | Path, fingerprint: Mapping[str, Any], mmap: bool = False):
        super().__init__(keys=["image"], allow_missing_keys=True)
        self.head, self.root, self.mmap = head, Path(root), mmap
        self.fingerprint = json.dumps(dict(fingerprint), sort_keys=True, default=str)
        self.usable = True

    def key(self, item: Mapping[Hashable, Any]) -> str:
        index = self.root / "checksums"
        images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
        sources = {
            "images": [source_checksum(p, index) for p in images],
            "label": source_checksum(item["label"], index) if item.get("label") else None,
            "modality": item.get("modality"),
        }
        text = json.dumps({"sources": sources, "settings": self.fingerprint}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.usable:
            return self.head(dict(data))
        try:
            entry = self.root / "entries" / self.key(data)
            if not (entry / "meta.json").is_file():
                self._build(dict(data), entry)
        except OSError as err:  # a full or read-only disk must not stop training
            log.warning("preprocessing cache %s is not usable (%s); reading volumes uncached", self.root, err)
            self.usable = False
            return self.head(dict(data))
        return self._load(dict(data), entry)

    def _build(self, item: dict, entry: Path) -> None:
        out = self.head(item)  # bad input raises here, before anything is written
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        try:
            image = out["image"]
            np.save(tmp / "image.npy", image.numpy(force=True) if torch.is_tensor(image) else np.asarray(image))
            meta = {"affine": np.asarray(image.affine).tolist(), "modality": out.get("modality"),
                    "image_dtype": str(image.dtype), "label_dtype": None, "sources": {"image": item["image"]}}
            if out.get("label") is not None:
                label = out["label"]
                np.save(tmp / "label.npy", _compact_label(label.numpy(force=True)))
                meta["label_dtype"], meta["sources"]["label"] = str(label.dtype), item["label"]
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not (entry / "meta.json").is_file():  # lost a race to another process: theirs is equal
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, item: dict, entry: Path) -> dict:
        meta = json.loads((entry / "meta.json").read_text())
        affine = torch.tensor(meta["affine"], dtype=torch.float64)
        image = np.load(entry / "image.npy", mmap_mode="r" if self.mmap else None)
        item["image"] = image if self.mmap else MetaTensor(torch.from_numpy(image), affine=affine)
        if meta["label_dtype"] is not None:
            dtype = getattr(torch, meta["label_dtype"].removeprefix("torch."))
            label = torch.from_numpy(np.load(entry / "label.npy")).to(dtype)
            item["label"] = MetaTensor(label, affine=affine.clone())
        else:
            item.pop("label", None)
        item["modality"] = meta["modality"]
        return item


def cached(head: list, root: str | Path | None, fingerprint: Mapping[str, Any], mmap: bool = False) -> list:
    """``head`` behind the cache at ``root``, or ``head`` itself when ``root`` is None."""
    if root is None:
        return head
    return [CachedPrefixd(Compose(head), root, fingerprint, mmap=mmap)]
