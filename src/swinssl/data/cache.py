"""On-disk cache of preprocessed volumes: decode, reorient, resample and normalise once.

The deterministic head of every training pipeline (read + check, orientation, spacing,
intensity normalisation, foreground crop) costs seconds per volume; random crops of the
result cost milliseconds. ``CachedPrefixd`` runs that head once per volume and stores its
output as ``.npy`` arrays; later visits read the arrays instead, memory-mapped for
pre-training so that a crop reads only its own voxels. An entry also keeps the head's
metadata and transform trace (``applied_operations``), so prediction can invert the
preprocessing of a cached volume (``Invertd``) exactly as of a freshly read one.

An entry's key is the SHA-256 of (the source files' SHA-256s, the item's declared
modality, the preprocessing settings the head uses, the cache format version, the MONAI
version). So an entry is rebuilt when a file's content or a setting changes, and stale
entries are never read (they stay on disk until the cache folder is removed). A file's
checksum is remembered next to the entries (``swinssl.data.checksums``), so unchanged files
are hashed once, not once per run.

Layout (``root`` is ``data.cache``, by default ``<train.out>/cache``)::

    root/entries/<key>/image.npy, label.npy (when labelled), meta.json (affine, metadata, trace)
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
from monai.transforms import Compose, InvertibleTransform, MapTransform
from monai.utils import TraceKeys

from swinssl.config import PreprocessConfig
from swinssl.data.checksums import source_checksum

CACHE_FORMAT = 2  # 2: entries keep metadata and transform trace
# Settings of the random tail (crop size and count, augmentation), not of the cached head.
TAIL_FIELDS = ("roi_size", "num_crops", "crop_sampling", "pos_fraction", "augment")

log = logging.getLogger(__name__)


def settings_fingerprint(cfg: PreprocessConfig, **extra: Any) -> dict[str, Any]:
    """What the cached head depends on besides the files: preprocessing settings (without the
    random tail's), the reader's expectations (``extra``: channels, classes...), versions."""
    settings = {k: v for k, v in vars(cfg).items() if k not in TAIL_FIELDS}
    return {"format": CACHE_FORMAT, "monai": monai.__version__, **settings, **extra}


def _compact_label(label: np.ndarray) -> np.ndarray:
    """Class indices in the smallest exact integer type (labels arrive as float32)."""
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if label.size == 0 or (label.min() >= info.min and label.max() <= info.max):
            return label.astype(dtype)
    return label


# --- metadata and traces as JSON ---------------------------------------------------------------
# Plain JSON cannot tell a tuple from a list or an array from a tensor, and MONAI's inverses
# rely on those types; so each is written as a small tagged object and read back as itself.


def to_json(value: Any) -> Any:
    """``value`` (metadata or a transform trace) as JSON data that ``from_json`` turns back into it."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value  # str subclasses (MONAI's enums) are written as their text
    if isinstance(value, np.ndarray | np.generic):
        return {"__numpy__": value.dtype.str, "shape": list(np.shape(value)), "data": np.ravel(value).tolist()}
    if torch.is_tensor(value):
        data = value.detach().cpu()
        return {"__torch__": str(data.dtype).removeprefix("torch."), "shape": list(data.shape),
                "data": data.flatten().tolist()}
    if isinstance(value, tuple):
        return {"__tuple__": [to_json(v) for v in value]}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: to_json(v) for k, v in value.items()}
        return {"__items__": [[to_json(k), to_json(v)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} in a cache entry")


def from_json(value: Any) -> Any:
    """The inverse of ``to_json``."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__numpy__" in value:
        array = np.array(value["data"], dtype=np.dtype(value["__numpy__"])).reshape(value["shape"])
        return array if value["shape"] else array[()]  # a 0-d entry was a NumPy scalar
    if "__torch__" in value:
        return torch.tensor(value["data"], dtype=getattr(torch, value["__torch__"])).reshape(value["shape"])
    if "__tuple__" in value:
        return tuple(from_json(v) for v in value["__tuple__"])
    if "__bytes__" in value:
        return bytes.fromhex(value["__bytes__"])
    if "__items__" in value:
        return {from_json(k): from_json(v) for k, v in value["__items__"]}
    return {k: from_json(v) for k, v in value.items()}


def _storable_meta(meta: Mapping) -> dict:
    """The metadata a reader produced, without values JSON cannot hold (exotic header fields)."""
    kept = {}
    for key, value in meta.items():
        try:
            kept[str(key)] = to_json(value)
        except TypeError:
            log.debug("cache entry: metadata %r (%s) not stored", key, type(value).__name__)
    return kept


def _portable_trace(operations: Any) -> Any:
    """A trace whose transform ids say "any instance": an id is the address of the object that
    ran the transform, and the process that inverts a cached volume holds other objects."""
    if isinstance(operations, list):
        return [_portable_trace(op) for op in operations]
    if isinstance(operations, dict):
        return {k: TraceKeys.NONE if k == TraceKeys.ID else _portable_trace(v) for k, v in operations.items()}
    return operations


def _describe(tensor: Any) -> dict:
    """What an entry keeps of a head output besides its voxels."""
    if not isinstance(tensor, MetaTensor):
        return {"meta": {}, "trace": []}
    return {"meta": _storable_meta(tensor.meta), "trace": to_json(_portable_trace(tensor.applied_operations))}


def _restore(array: np.ndarray, dtype: torch.dtype, affine: torch.Tensor, described: Mapping) -> MetaTensor:
    meta = from_json(described["meta"])
    meta["affine"] = affine
    return MetaTensor(torch.from_numpy(array).to(dtype), meta=meta, applied_operations=from_json(described["trace"]))


class CachedPrefixd(MapTransform, InvertibleTransform):
    """Run ``head`` (a deterministic pipeline) through the cache at ``root``.

    The result holds ``image`` (and ``label`` when the head produced one) with the head's
    values bit for bit, plus the head's ``modality``. ``mmap``: the image comes back as a
    read-only memory-mapped ``(C, X, Y, Z)`` array (crop it with ``RandCropsd``); otherwise
    as a MetaTensor with the head's affine, metadata and trace (labels restored to the
    head's dtype), which ``inverse`` (the head's inverse) maps back to the file's grid.
    An unwritable ``root`` is reported once and the head runs uncached.
    """

    def __init__(self, head: Compose, root: str | Path, fingerprint: Mapping[str, Any], mmap: bool = False):
        super().__init__(keys=["image"], allow_missing_keys=True)
        self.head, self.root, self.mmap = head, Path(root), mmap
        self.fingerprint = json.dumps(dict(fingerprint), sort_keys=True, default=str)
        self.usable, self.ready = True, False

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
        if self.usable and not self.ready:
            try:
                for folder in ("entries", "checksums"):
                    (self.root / folder).mkdir(parents=True, exist_ok=True)
                self.ready = True
            except OSError as err:
                self._give_up(err)
        if not self.usable:
            return self.head(dict(data))
        try:
            entry = self.root / "entries" / self.key(data)
        except OSError:  # an unreadable source, not the cache's fault: the head reports it by name
            return self.head(dict(data))
        if not (entry / "meta.json").is_file():
            out = self.head(dict(data))  # bad input raises here, before anything is written
            try:
                self._write(dict(data), out, entry)
            except OSError as err:  # a full or read-only disk must not stop training
                self._give_up(err)
                return out
        return self._load(dict(data), entry)

    def _give_up(self, err: OSError) -> None:
        log.warning("preprocessing cache %s is not usable (%s); reading volumes uncached", self.root, err)
        self.usable = False

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.head.inverse(data)

    def _write(self, item: dict, out: dict, entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        try:
            image = out["image"]
            np.save(tmp / "image.npy", image.numpy(force=True) if torch.is_tensor(image) else np.asarray(image))
            meta = {"affine": np.asarray(image.affine).tolist(), "modality": out.get("modality"),
                    "image_dtype": str(image.dtype), "label_dtype": None, "sources": {"image": item["image"]},
                    "image_meta": _describe(image)}
            if out.get("label") is not None:
                label = out["label"]
                np.save(tmp / "label.npy", _compact_label(label.numpy(force=True)))
                meta["label_dtype"], meta["sources"]["label"] = str(label.dtype), item["label"]
                meta["label_meta"] = _describe(label)
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
        if self.mmap:
            item["image"] = image
        else:
            item["image"] = _restore(image, _torch_dtype(meta["image_dtype"]), affine, meta["image_meta"])
        if meta["label_dtype"] is not None:
            label = np.load(entry / "label.npy")
            item["label"] = _restore(label, _torch_dtype(meta["label_dtype"]), affine.clone(), meta["label_meta"])
        else:
            item.pop("label", None)
        item["modality"] = meta["modality"]
        return item


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def cached(head: list, root: str | Path | None, fingerprint: Mapping[str, Any], mmap: bool = False) -> list:
    """``head`` behind the cache at ``root``, or ``head`` itself when ``root`` is None."""
    if root is None:
        return head
    return [CachedPrefixd(Compose(head), root, fingerprint, mmap=mmap)]
