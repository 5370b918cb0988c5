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
    root/entries/<key>.building               the claim of the process building that entry
    root/checksums/<sha1 of the source path>.json
    root/bad/<sha1 of the volume path>[.labelled].json   a volume the head refused, and why

Entries are written to a temporary folder and renamed into place, so a killed run never
leaves a half-written entry. Before running the head for a missing entry a process claims it
(``<key>.building``, created with ``O_CREAT | O_EXCL``, so exactly one process wins on a local
or shared file system); the others wait for the entry instead of building it again, so
training workers, prediction and ``swinssl data prepare`` on many nodes sharing one folder
build every entry once. A claim whose holder died (same host, process gone) or that is older
than ``CLAIM_TIMEOUT_S`` is taken over, through a second short-lived lock so that two waiters
never both remove it.

A volume whose head raises ``DataError`` gets a bad record (its path, size, mtime_ns and the
one-line reason): later visits raise ``KnownBad`` with that reason without reading the file,
until the file (or its label) changes. ``prepared_bad`` reads the records of a list of files.

``dtype`` (``data.cache_dtype``): images are stored as float32 or float16 and always read back
as float32 (whole volumes as float32 tensors; memory-mapped float16 arrays become float32 in
each crop). float16 entries have keys of their own, float32 ones keep the keys they had.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Hashable, Iterable, Literal, Mapping

import monai
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform
from monai.utils import TraceKeys

from swinssl.config import PreprocessConfig
from swinssl.data.checksums import files_of, remembered, source_checksum
from swinssl.errors import DataError
from swinssl.utils import atomic_write_text

CACHE_FORMAT = 2  # 2: entries keep metadata and transform trace
# Settings of the random tail (crop size and count, augmentation), not of the cached head.
TAIL_FIELDS = ("roi_size", "num_crops", "crop_sampling", "pos_fraction", "augment")

STORED_DTYPES = ("float32", "float16")
CLAIM_TIMEOUT_S = 600.0  # a claim older than this is taken over, whoever holds it (a hung or far-away builder)
TAKEOVER_TIMEOUT_S = 60.0  # the take-over lock is held for milliseconds: older, its holder died
POLL_S = 0.2  # how often a process waiting for another's entry looks again
HOST = socket.gethostname()

log = logging.getLogger(__name__)


class KnownBad(DataError):
    """A volume with a valid bad record: refused with the recorded reason, the file not read again."""


def cache_root(cfg) -> Path | None:
    """The preprocessing cache folder of a config (``data.cache``): None when ``off``; ``auto`` is
    ``<train.out>/cache``."""
    if cfg.data.cache in ("off", ""):
        return None
    return Path(cfg.train.out) / "cache" if cfg.data.cache == "auto" else Path(cfg.data.cache)


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


def _stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` as an entry stores it: float16 when asked and every value fits float16's range,
    else as it is (a z-scored outlier past 65504 keeps the entry float32, not infinite)."""
    if dtype != "float16" or array.dtype.kind != "f":
        return array
    if array.size and np.abs(array).max() > np.finfo(np.float16).max:
        return array
    return array.astype(np.float16)


def _first_image(item: Mapping) -> str:
    image = item["image"]
    return str(image if isinstance(image, (str, Path)) else image[0])


def source_files(item: Mapping) -> list[str]:
    """The image file(s) of an item, then its label (when it has one)."""
    images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
    return [str(p) for p in images] + ([str(item["label"])] if item.get("label") else [])


def _remembered_source(path: str | Path, memo: Path) -> str | None:
    """``source_checksum`` from the memo alone: None when a file of the source would have to be read."""
    path = Path(path)
    files = files_of(path)
    if len(files) == 1 and files[0] == path:
        return remembered(path, memo)
    combined = hashlib.sha256()  # as source_checksum combines a DICOM folder's files
    for f in files:
        known = remembered(f, memo)
        if known is None:
            return None
        combined.update(f.relative_to(path).as_posix().encode() + b"\0" + known.encode())
    return combined.hexdigest()


# --- claims: one builder per entry, across processes and nodes --------------------------------------


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (Linux: clock ticks after boot), which tells the claim's holder
    from a later process that got its pid; None where ``/proc`` does not say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5), the 20th after the name


def _alive(holder: Mapping) -> bool:
    """Whether the process that wrote the claim ``holder`` (on this host) still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists (another user's process)
    started = holder.get("started")
    return started is None or _process_start(pid) in (None, started)


def claim_file(entry: Path) -> Path:
    """Where the claim of ``entry`` lives."""
    return entry.with_name(entry.name + ".building")


class Claim:
    """The right to build one entry: the file ``<entry>.building`` (``claim_file``), holding the
    host, pid, process start, time and a token of its holder."""

    def __init__(self, path: Path | None):
        self.path, self.token = path, uuid.uuid4().hex

    @classmethod
    def take(cls, entry: Path) -> Claim | None:
        """The claim of ``entry``, or None when another process holds it. Where no file can be
        created (a read-only cache) the claim is unheld: the build goes on, and its write fails alike."""
        claim = cls(claim_file(entry))
        try:
            fd = os.open(claim.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        except OSError:
            return cls(None)
        with os.fdopen(fd, "w") as f:
            json.dump({"host": HOST, "pid": os.getpid(), "started": _process_start(os.getpid()),
                       "time": time.time(), "token": claim.token}, f)
        return claim

    def release(self) -> None:
        """Remove the claim file, if it is still this claim (not taken over meanwhile)."""
        if self.path is None:
            return
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass


def stale_claim(path: Path) -> str | None:
    """The text of the claim file ``path`` if nobody will finish its entry: its holder ran on this
    host and is gone, or it is older than ``CLAIM_TIMEOUT_S``; None while it is held (or absent)."""
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except OSError:
        return None
    if age > CLAIM_TIMEOUT_S:
        return text
    try:
        holder = json.loads(text)
    except ValueError:
        return None  # created but not yet filled: only its age can make it stale
    if not isinstance(holder, dict) or holder.get("host") != HOST:
        return None  # another node's process: its age decides
    return None if _alive(holder) else text


def take_over(path: Path, stale_text: str) -> None:
    """Remove the stale claim ``path`` (whose text was ``stale_text``) unless another process has
    replaced it meanwhile. The lock ``<claim>.takeover`` lets one waiter at a time look and remove,
    so that a waiter late to see the old claim never removes the new one."""
    lock = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - lock.stat().st_mtime > TAKEOVER_TIMEOUT_S:
                lock.unlink()  # its holder died between two lines
        except OSError:
            pass
        return
    except OSError:
        return
    try:
        if path.read_text() == stale_text:
            path.unlink()
    except OSError:
        pass
    finally:
        lock.unlink(missing_ok=True)


# --- bad records: volumes the head refused ----------------------------------------------------------


def _stamp(path: str | Path) -> dict:
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def bad_record_file(root: str | Path, volume: str | Path, labelled: bool = False) -> Path:
    """The bad record of ``volume`` (an item's first image file) in the cache at ``root``: one for
    image-only heads (pre-training, prediction), one for image + label heads (fine-tuning), so a bad
    label never marks its image bad for pre-training."""
    name = hashlib.sha1(str(Path(volume).resolve()).encode()).hexdigest()
    return Path(root) / "bad" / f"{name}{'.labelled' if labelled else ''}.json"


def read_bad_record(record: Path, settings: str | None = None) -> str | None:
    """The reason of the bad record ``record`` while it is valid: the volume (and every other file it
    stamped: channels, label) has the size and mtime_ns it had when refused, and, when ``settings``
    is given, the head's settings are those it was refused under. Else None."""
    try:
        saved = json.loads(record.read_text())
        for stamp in [saved, *saved.get("also", [])]:
            stat = os.stat(stamp["path"])  # stored resolved: one stat, no path walk
            if (stat.st_size, stat.st_mtime_ns) != (stamp["size"], stamp["mtime_ns"]):
                return None
        if settings is not None and saved.get("settings") != settings:
            return None
        return str(saved["reason"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def prepared_bad(root: str | Path, files: Iterable[str | Path], labelled: bool = False,
                 settings: str | None = None) -> dict[str, str]:
    """``{file: one-line reason}`` of the ``files`` (items' first image files, as the caller names
    them) that the cache at ``root`` holds valid bad records of (``read_bad_record``): one small
    file read and a stat or two per file, no volume read. ``labelled``: the records of image + label
    heads; ``settings``: only records made under these head settings (``CachedPrefixd.settings``)."""
    found = {}
    for file in files:
        reason = read_bad_record(bad_record_file(root, file, labelled), settings)
        if reason is not None:
            found[str(file)] = reason
    return found


class CachedPrefixd(MapTransform, InvertibleTransform):
    """Run ``head`` (a deterministic pipeline) through the cache at ``root``.

    The result holds ``image`` (and ``label`` when the head produced one) with the head's
    values bit for bit (float16 entries: rounded to float16), plus the head's ``modality``.
    ``mmap``: the image comes back as a read-only memory-mapped ``(C, X, Y, Z)`` array (crop it
    with ``RandCropsd``, which returns float32); otherwise as a float32 MetaTensor with the head's
    affine, metadata and trace (labels restored to the head's dtype), which ``inverse`` (the head's
    inverse) maps back to the file's grid. ``dtype``: how images are stored (``STORED_DTYPES``).
    An unwritable ``root`` is reported once and the head runs uncached.
    """

    def __init__(self, head: Compose, root: str | Path, fingerprint: Mapping[str, Any], mmap: bool = False,
                 dtype: Literal["float32", "float16"] = "float32"):
        super().__init__(keys=["image"], allow_missing_keys=True)
        if dtype not in STORED_DTYPES:
            raise ValueError(f"cache dtype {dtype!r}: expected one of {', '.join(STORED_DTYPES)}")
        self.head, self.root, self.mmap, self.dtype = head, Path(root), mmap, dtype
        self.settings_of_head = dict(fingerprint)
        settings = json.dumps(self.settings_of_head, sort_keys=True, default=str)
        # float32 entries keep the keys they had before the storage dtype was a setting
        self.fingerprint = settings if dtype == "float32" else json.dumps(
            {**self.settings_of_head, "cache_dtype": dtype}, sort_keys=True, default=str)
        # What a bad record was refused under: the head's settings, not how entries are stored.
        self.settings = hashlib.sha256(settings.encode()).hexdigest()
        self.usable, self.ready, self.error = True, False, None

    def with_dtype(self, dtype: Literal["float32", "float16"]) -> CachedPrefixd:
        """This head and cache, storing images as ``dtype``."""
        return CachedPrefixd(self.head, self.root, self.settings_of_head, self.mmap, dtype)

    def key(self, item: Mapping[Hashable, Any], hash_new: bool = True) -> str | None:
        """The entry key of ``item``. ``hash_new`` false: None when a source file is not in the
        checksum memo (the key would need its bytes). An unreadable source raises ``OSError``."""
        memo = self.root / "checksums"
        checksum = source_checksum if hash_new else _remembered_source
        images = item["image"] if isinstance(item["image"], (list, tuple)) else [item["image"]]
        sums = [checksum(p, memo) for p in images]
        label = checksum(item["label"], memo) if item.get("label") else None
        if None in sums or (item.get("label") and label is None):
            return None
        sources = {"images": sums, "label": label, "modality": item.get("modality")}
        text = json.dumps({"sources": sources, "settings": self.fingerprint}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def entry(self, key: str) -> Path:
        """The folder of the entry ``key``."""
        return self.root / "entries" / key

    def recorded_bad(self, item: Mapping[Hashable, Any]) -> str | None:
        """The reason of ``item``'s valid bad record under this head's settings, else None."""
        record = bad_record_file(self.root, _first_image(item), labelled=bool(item.get("label")))
        return read_bad_record(record, self.settings)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self._ready():
            return self.head(dict(data))
        try:
            entry = self.entry(self.key(data))
        except OSError:  # an unreadable source, not the cache's fault: the head reports it by name
            return self.head(dict(data))
        _, out = self._build(dict(data), entry, wait=True)
        if out is not None and not entry_complete(entry):  # built but not stored: a full or read-only disk
            return out
        return self._load(dict(data), entry)

    def ensure(self, item: Mapping[Hashable, Any], wait: bool = True) -> str:
        """Make ``item``'s entry exist without loading it: "present" (found), "built" (by this
        process), or, with ``wait`` false, "claimed" (another process is building it). Raises the
        head's ``DataError`` (``KnownBad`` for a valid bad record) and ``OSError`` for an unreadable
        source or a cache folder where the entry cannot be written."""
        if not self._ready():
            raise self.error
        entry = self.entry(self.key(item))
        status, _ = self._build(dict(item), entry, wait)
        if status == "built" and not entry_complete(entry):
            raise self.error or OSError(f"{entry}: entry not written")
        return status

    def _ready(self) -> bool:
        if self.usable and not self.ready:
            try:
                for folder in ("entries", "checksums"):
                    (self.root / folder).mkdir(parents=True, exist_ok=True)
                self.ready = True
            except OSError as err:
                self._give_up(err)
        return self.usable

    def _build(self, item: dict, entry: Path, wait: bool) -> tuple[str, dict | None]:
        """``("present" | "built" | "claimed", the head's output when built here)``: builds the entry
        under its claim; while another process holds the claim, waits for its entry (``wait``,
        taking a stale claim over) or returns "claimed"."""
        while True:
            if entry_complete(entry):
                return "present", None
            reason = self.recorded_bad(item)
            if reason is not None:
                raise KnownBad(reason)
            claim = Claim.take(entry)
            if claim is not None:
                try:
                    if entry_complete(entry):  # finished by another process between the look and the claim
                        return "present", None
                    out = self._run_head(item)  # bad input raises here, before anything is written
                    try:
                        self._write(item, out, entry)
                    except OSError as err:  # a full or read-only disk must not stop training
                        self._give_up(err)
                    return "built", out
                finally:
                    claim.release()
            if not wait:
                return "claimed", None
            stale = stale_claim(claim_file(entry))
            if stale is not None:
                take_over(claim_file(entry), stale)
            else:
                time.sleep(POLL_S)

    def _run_head(self, item: dict) -> dict:
        """The head's output for ``item``; a ``DataError`` is recorded (a bad record) and raised."""
        try:
            stamps = [_stamp(p) for p in source_files(item)]  # before reading: a file changed meanwhile is looked at again
        except OSError:
            stamps = None  # a missing file: the head says so; nothing to stamp
        try:
            return self.head(dict(item))
        except Exception as err:  # noqa: BLE001 - MONAI wraps a transform's DataError in a RuntimeError
            bad = _data_error(err)
            if bad is None:
                raise
        if stamps is not None:
            self._record_bad(item, stamps, str(bad))
        raise bad

    def _record_bad(self, item: dict, stamps: list[dict], reason: str) -> None:
        record = bad_record_file(self.root, _first_image(item), labelled=bool(item.get("label")))
        first, *also = stamps
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(record, json.dumps({**first, "reason": " ".join(reason.split("\n")),
                                                  "settings": self.settings, "also": also}))
        except OSError:
            pass  # a read-only cache: the volume is examined again next time

    def _give_up(self, err: OSError) -> None:
        log.warning("preprocessing cache %s is not usable (%s); reading volumes uncached", self.root, err)
        self.usable, self.error = False, err

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return self.head.inverse(data)

    def _write(self, item: dict, out: dict, entry: Path) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        try:
            image = out["image"]
            array = image.numpy(force=True) if torch.is_tensor(image) else np.asarray(image)
            stored = _stored(array, self.dtype)
            np.save(tmp / "image.npy", stored)
            meta = {"affine": np.asarray(image.affine).tolist(), "modality": out.get("modality"),
                    "image_dtype": str(image.dtype), "stored_dtype": str(stored.dtype), "label_dtype": None,
                    "sources": {"image": item["image"]}, "image_meta": _describe(image)}
            if out.get("label") is not None:
                label = out["label"]
                np.save(tmp / "label.npy", _compact_label(label.numpy(force=True)))
                meta["label_dtype"], meta["sources"]["label"] = str(label.dtype), item["label"]
                meta["label_meta"] = _describe(label)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            try:
                os.rename(tmp, entry)
            except OSError:
                if not entry_complete(entry):  # lost a race to another process: theirs is equal
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _load(self, item: dict, entry: Path) -> dict:
        meta = json.loads((entry / "meta.json").read_text())
        affine = torch.tensor(meta["affine"], dtype=torch.float64)
        image = np.load(entry / "image.npy", mmap_mode="r" if self.mmap else None)
        if self.mmap:
            item["image"] = image  # float16 entries: each crop becomes float32 (crop_with_padding)
        else:
            item["image"] = _restore(image, _torch_dtype(meta["image_dtype"]), affine, meta["image_meta"])
        if meta["label_dtype"] is not None:
            label = np.load(entry / "label.npy")
            item["label"] = _restore(label, _torch_dtype(meta["label_dtype"]), affine.clone(), meta["label_meta"])
        else:
            item.pop("label", None)
        item["modality"] = meta["modality"]
        return item


def entry_complete(entry: Path) -> bool:
    """An entry is there once its folder (renamed into place whole) holds ``meta.json``."""
    return (entry / "meta.json").is_file()


def _data_error(err: BaseException) -> DataError | None:
    """The ``DataError`` that ``err`` is or was caused by (MONAI's Compose wraps it), else None."""
    while err is not None and not isinstance(err, DataError):
        err = err.__cause__
    return err


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def cached(head: list, root: str | Path | None, fingerprint: Mapping[str, Any], mmap: bool = False,
           dtype: Literal["float32", "float16"] = "float32") -> list:
    """``head`` behind the cache at ``root`` storing images as ``dtype``, or ``head`` itself when
    ``root`` is None."""
    if root is None:
        return head
    return [CachedPrefixd(Compose(head), root, fingerprint, mmap=mmap, dtype=dtype)]
