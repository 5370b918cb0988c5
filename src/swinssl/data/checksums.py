"""Checksums of data files, remembered so that an unchanged corpus is never read twice.

A file's SHA-256 is kept in a memo folder by (resolved path, size, mtime_ns): one small JSON
file per source file, named by the SHA-1 of its path, so processes and nodes sharing the
folder never write the same file for different sources. A run's manifest, the cache's entry
keys and ``swinssl data prepare`` all read one memo (``<cache>/checksums``), so a run start
over a corpus that has not changed opens one memo file per volume and reads no volume bytes;
new or changed files are hashed in parallel threads (``hashlib`` releases the GIL).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from swinssl.utils import atomic_write_text, sha256_file

HASH_THREADS = min(8, os.cpu_count() or 1)  # SHA-256 runs at ~0.7 GB/s a core: more threads than disks gain little


def files_of(path: Path) -> list[Path]:
    """The files a source consists of: itself, or every file of a DICOM series folder."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _stamp(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _memo_file(memo: Path, stamp: dict) -> Path:
    return memo / f"{hashlib.sha1(stamp['path'].encode()).hexdigest()}.json"


def remembered(path: Path, memo: Path | None) -> str | None:
    """The memo's SHA-256 of ``path`` if its size and mtime are unchanged since it was hashed, else None."""
    if memo is None:
        return None
    stamp = _stamp(path)
    try:
        saved = json.loads(_memo_file(memo, stamp).read_text())
        if {k: saved.get(k) for k in stamp} == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or unreadable: hashed again
    return None


def file_checksum(path: Path, memo: Path | None = None) -> str:
    """SHA-256 of a file's bytes, remembered in ``memo`` by (resolved path, size, mtime_ns)."""
    known = remembered(path, memo)
    if known is not None:
        return known
    stamp = _stamp(path)  # before reading: a file changed while hashed is hashed again next time
    digest = sha256_file(path)
    if memo is not None:
        try:
            memo.mkdir(parents=True, exist_ok=True)
            atomic_write_text(_memo_file(memo, stamp), json.dumps({**stamp, "sha256": digest}))
        except OSError:
            pass  # a read-only memo is still read: the file is hashed again next time
    return digest


def source_checksum(path: str | Path, memo: Path | None = None) -> str:
    """Checksum of one source: a file's SHA-256, or a DICOM folder's (its files' checksums in order)."""
    path = Path(path)
    files = files_of(path)
    if len(files) == 1 and files[0] == path:
        return file_checksum(path, memo)
    combined = hashlib.sha256()
    for f in files:
        combined.update(f.relative_to(path).as_posix().encode() + b"\0" + file_checksum(f, memo).encode())
    return combined.hexdigest()


def source_checksums(sources: Iterable[str | Path], memo: Path | None,
                     threads: int = HASH_THREADS) -> dict[str, str]:
    """``{str(source): source_checksum}`` of every source: remembered ones read from the memo, the
    others hashed ``threads`` at a time. An unreadable source raises its ``OSError``."""
    sources = list(dict.fromkeys(str(s) for s in sources))
    if threads <= 1 or len(sources) < 2:
        return {s: source_checksum(s, memo) for s in sources}
    with ThreadPoolExecutor(threads) as pool:
        return dict(zip(sources, pool.map(lambda s: source_checksum(s, memo), sources)))


def source_bytes(path: str | Path) -> int:
    """The bytes of one source (a DICOM folder: all its files)."""
    return sum(f.stat().st_size for f in files_of(Path(path)))
