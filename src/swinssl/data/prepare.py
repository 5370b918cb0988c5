"""``swinssl data prepare``: the deterministic preprocessing of a whole dataset into the cache, once.

As nnU-Net's ``nnUNetv2_preprocess -np K``, before training: ``workers`` processes each build the
cached head of the stage's pipeline once (``transforms.pretrain_transforms`` or
``finetune_transforms``, so the head, its settings and the entry keys are those training and
prediction look up) and run it volume after volume. Pre-training prepares the images of the
training and validation cases; fine-tuning the labelled ones with their labels.

- Resumable: a volume whose files are in the checksum memo and whose entry exists is counted
  without being opened; an entry appears whole (``swinssl.data.cache``), so a killed prepare loses
  at most the volumes in flight, and the next run goes on.
- Bad volumes: a volume the head refuses (unreadable, truncated, NaN, 2D, a label of another grid)
  gets a bad record in the cache, which training and prediction read (``prepared_bad``); the rest
  go on. A rerun lists recorded ones without reading them, and examines a file again once it changed.
- Many processes or nodes on one cache folder: each entry is claimed before its head runs
  (``cache.Claim``); a volume claimed by another process is passed over and looked at again at
  the end, when its entry is there (or its holder died, and it is built here). No entry is built twice.

The report, ``<cache>/prepare/<stage>.json`` (summary and every bad volume with its reason) and
``<stage>.txt`` (the same for people), is written atomically at the end of each prepare.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch

from swinssl.config import Config
from swinssl.data.cache import CachedPrefixd, KnownBad, cache_root, entry_complete, prepared_bad, source_files
from swinssl.data.checksums import source_bytes
from swinssl.data.discover import find_dataset
from swinssl.data.splits import class_indices
from swinssl.data.transforms import case_item, finetune_transforms, pretrain_transforms, volume_file
from swinssl.errors import ConfigError, DataError
from swinssl.utils import atomic_write_text

__all__ = ["STAGES", "PrepareSummary", "prepare", "prepared_bad", "stage_head", "stage_items"]

STAGES = ("pretrain", "finetune")
IN_FLIGHT_PER_WORKER = 2  # volumes handed to a worker ahead: it never idles, and a kill loses few


@dataclass
class PrepareSummary:
    """What one prepare did. ``bad``: ``{volume file: one-line reason}`` in dataset order."""

    stage: str
    data: str
    cache: str
    volumes: int = 0
    cached: int = 0  # entries already there at the start: not opened
    built: int = 0  # entries this prepare built
    built_elsewhere: int = 0  # entries another process sharing the cache built meanwhile
    bytes_read: int = 0  # bytes of the volume (and label) files this prepare decoded
    cache_bytes: int = 0  # bytes of this dataset's entries in the cache, at the end
    seconds: float = 0.0
    bad: dict[str, str] = field(default_factory=dict)
    report: str = ""

    @property
    def failures(self) -> int:
        return len(self.bad)

    def lines(self, shown: int | None = 20) -> list[str]:
        """The summary as printed at the end, with the first ``shown`` bad volumes (None: all)."""
        shown = self.failures if shown is None else shown
        out = [f"prepared {self.volumes} volumes ({self.stage}) in {self.seconds:.1f} s: {self.cached} already "
               f"cached, {self.built} built, {self.built_elsewhere} built by another process, {self.failures} bad",
               f"read {_size(self.bytes_read)} of volumes; cache {_size(self.cache_bytes)} for this dataset's "
               f"entries in {self.cache}"]
        if self.bad:
            out.append(f"bad volumes ({self.failures}), skipped by training and prediction:")
            out += [f"  {reason if reason.startswith(file) else f'{file}: {reason}'}"
                    for file, reason in itertools.islice(self.bad.items(), shown)]
            if self.failures > shown:
                out.append(f"  ... and {self.failures - shown} more (all in the report)")
        if self.report:
            out.append(f"report: {self.report}")
        return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def stage_items(cfg: Config, stage: str) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The pipeline items of every volume ``stage`` trains on (``case_item``: pre-training, the images of
    the training and validation cases; fine-tuning, the labelled ones with labels), and fine-tuning's
    classes (None for pre-training). Never a dataset's test cases."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty: pass data=PATH (a folder, dataset.json or nnU-Net raw folder)")
    dataset = find_dataset(cfg.data.path, cfg.data.modality)
    if stage == "pretrain":
        cases = [replace(c, label=None) for c in dataset.split("training", "validation")]
        if not cases:
            raise DataError(f"{cfg.data.path}: no training volumes (only test cases)")
        return [case_item(c) for c in cases], None
    cases = [c for c in dataset.split("training", "validation") if c.label is not None]
    if not cases:
        raise DataError(f"{dataset.root}: no labelled training cases (fine-tuning needs image + label pairs)")
    return [case_item(c) for c in cases], class_indices(dataset, cfg.data.num_classes)


def stage_head(cfg: Config, stage: str, root: str | Path, classes: list[int] | None = None) -> CachedPrefixd:
    """The cached head of ``stage``'s training pipeline at ``root``, storing images as ``data.cache_dtype``:
    taken out of the pipeline the stage builds, so its settings and keys are the stage's."""
    if stage == "pretrain":
        pipeline = pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels, cache=root)
    else:
        pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=cfg.model.in_channels, train=False,
                                       cache=root)
    head = next(t for t in pipeline.transforms if isinstance(t, CachedPrefixd))
    return head.with_dtype(cfg.data.cache_dtype)


# --- one volume --------------------------------------------------------------------------------------
# An outcome is (index, "present" | "built" | "claimed" | "bad", bytes decoded, reason or None).
Outcome = tuple[int, str, int, "str | None"]


def _unreadable(item: dict, err: OSError) -> str:
    return f"{err.filename or volume_file(item)}: cannot read ({err.strerror or err})"


def _look(head: CachedPrefixd, index: int, item: dict) -> Outcome | None:
    """The outcome of ``item`` known without reading a volume (its entry, or its valid bad record), else None."""
    try:
        key = head.key(item, hash_new=False)
    except OSError as err:  # missing or unreadable: nothing to build
        return index, "bad", 0, _unreadable(item, err)
    if key is not None and entry_complete(head.entry(key)):
        return index, "present", 0, None
    reason = head.recorded_bad(item)
    return (index, "bad", 0, reason) if reason is not None else None


def _decoded_bytes(item: dict) -> int:
    try:
        return sum(source_bytes(p) for p in source_files(item))
    except OSError:
        return 0


def _examine(head: CachedPrefixd, index: int, item: dict, wait_for_others: bool) -> Outcome:
    """Build ``item``'s entry unless present or claimed by another process (``wait_for_others``: wait for
    it). An unwritable cache raises: nothing more can be prepared."""
    try:
        head.key(item)  # hashes new files (into the memo); an unreadable source is a bad volume
    except OSError as err:
        return index, "bad", 0, _unreadable(item, err)
    try:
        status = head.ensure(item, wait=wait_for_others)
    except KnownBad as err:  # another process refused it meanwhile: not read here
        return index, "bad", 0, str(err)
    except DataError as err:
        return index, "bad", _decoded_bytes(item), " ".join(str(err).split("\n"))
    return index, status, _decoded_bytes(item) if status == "built" else 0, None


_worker_head: CachedPrefixd | None = None  # a worker process's head, built once by _start_worker


def _start_worker(cfg: Config, stage: str, root: str, classes: list[int] | None, threads: int) -> None:
    global _worker_head
    torch.set_num_threads(threads)  # K workers share the cores, as nnU-Net's preprocessing does
    _worker_head = stage_head(cfg, stage, root, classes)


def _in_worker(index: int, item: dict, wait_for_others: bool) -> Outcome:
    return _examine(_worker_head, index, item, wait_for_others)


class _Runner:
    """Runs ``_examine`` over indices: in this process (``workers`` 1) or in a pool of ``workers``
    processes, each holding its own head, with a few volumes per worker in flight."""

    def __init__(self, head: CachedPrefixd, items: list[dict], workers: int, start: tuple):
        self.head, self.items, self.workers = head, items, workers
        self.pool = None
        if workers > 1:
            threads = max(1, (os.cpu_count() or 1) // workers)
            # Workers fork from a fresh server process, never from this one: a process forked after torch ran
            # OpenMP threads can hang in its first parallel region (GNU libgomp is not fork-safe).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
            self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                            initargs=(*start, threads))

    def run(self, indices: list[int], wait_for_others: bool) -> Iterator[Outcome]:
        if self.pool is None:
            for i in indices:
                yield _examine(self.head, i, self.items[i], wait_for_others)
            return
        queue, running = iter(indices), set()
        try:
            while True:
                for i in itertools.islice(queue, IN_FLIGHT_PER_WORKER * self.workers - len(running)):
                    running.add(self.pool.submit(_in_worker, i, self.items[i], wait_for_others))
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BrokenProcessPool:
            raise DataError(f"{self.head.root}: a prepare worker process died (out of memory, or a reader crashed "
                            f"on a volume); the entries built so far are kept: run prepare again to go on "
                            f"(fewer --workers if memory ran out)") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# --- the whole dataset -------------------------------------------------------------------------------


def prepare(cfg: Config, stage: str = "pretrain", workers: int = 1, progress: bool = True) -> PrepareSummary:
    """Build the cache entries of every volume ``stage`` trains on (``stage_items``) into the cache
    folder of ``cfg`` (``data.cache``), ``workers`` processes at a time; list the bad ones in the cache
    (bad records) and in the report ``<cache>/prepare/<stage>.json`` / ``.txt``. ``progress``: a bar
    with volumes/s and the time left (on a terminal)."""
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: expected one of {', '.join(STAGES)}")
    if workers < 1:
        raise ConfigError(f"--workers {workers}: at least 1 process")
    root = cache_root(cfg)
    if root is None:
        raise ConfigError("data.cache=off: swinssl data prepare fills the preprocessing cache; set data.cache=auto "
                          "(<train.out>/cache, as training uses) or data.cache=FOLDER")
    started = time.perf_counter()
    items, classes = stage_items(cfg, stage)
    head = stage_head(cfg, stage, root, classes)
    for folder in ("entries", "checksums", "bad", "prepare"):
        (root / folder).mkdir(parents=True, exist_ok=True)  # an unwritable folder: one line, before any work
    summary = PrepareSummary(stage=stage, data=str(cfg.data.path), cache=str(root), volumes=len(items))
    outcomes: dict[int, Outcome] = {}
    todo = []
    for i, item in enumerate(items):
        known = _look(head, i, item)
        if known is None:
            todo.append(i)
        else:
            outcomes[i] = known
    summary.cached = sum(1 for o in outcomes.values() if o[1] == "present")
    runner = _Runner(head, items, min(workers, max(1, len(todo))), (cfg, stage, str(root), classes))
    bar = _bar(len(items), len(items) - len(todo), stage, progress)
    try:
        claimed = _collect(runner.run(todo, wait_for_others=False), outcomes, summary, bar)
        _collect(runner.run(claimed, wait_for_others=True), outcomes, summary, bar)  # their entries, or their takeover
    finally:
        bar.close()
        runner.close()
    summary.bad = {volume_file(items[i]): outcomes[i][3] for i in sorted(outcomes) if outcomes[i][1] == "bad"}
    summary.cache_bytes = _entries_bytes(head, items)
    summary.seconds = time.perf_counter() - started
    summary.report = str(_write_report(root, summary))
    return summary


def _bar(total: int, done: int, stage: str, progress: bool):
    from tqdm import tqdm

    # initial: volumes found cached are not counted in the rate, so the time left is that of the building
    return tqdm(total=total, initial=done, desc=f"prepare {stage}", unit="vol", file=sys.stderr,
                disable=None if progress else True, dynamic_ncols=True)


def _collect(outcomes: Iterator[Outcome], into: dict[int, Outcome], summary: PrepareSummary, bar) -> list[int]:
    """Count ``outcomes`` into ``summary``; returns the indices another process had claimed."""
    claimed, bad = [], sum(1 for o in into.values() if o[1] == "bad")
    for outcome in outcomes:
        index, status, decoded, _ = outcome
        summary.bytes_read += decoded
        if status == "claimed":
            claimed.append(index)
            continue
        into[index] = outcome
        summary.built += status == "built"
        summary.built_elsewhere += status == "present"
        bar.update(1)
        if status == "bad":
            bad += 1
            bar.set_postfix(bad=bad, refresh=False)
    return claimed


def _entries_bytes(head: CachedPrefixd, items: list[dict]) -> int:
    """Bytes of the entries of ``items`` in the cache (keys from the memo: no volume read)."""
    total = 0
    for item in items:
        try:
            key = head.key(item, hash_new=False)
        except OSError:
            continue
        entry = head.entry(key) if key else None
        if entry is not None and entry_complete(entry):
            total += sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
    return total


def _write_report(root: Path, summary: PrepareSummary) -> Path:
    """``<root>/prepare/<stage>.json`` and ``.txt``, each written whole; returns the text one."""
    folder = root / "prepare"
    text = folder / f"{summary.stage}.txt"
    record = {k: v for k, v in asdict(summary).items() if k not in ("bad", "report")}
    record["failures"] = summary.failures
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["bad"] = [{"file": file, "reason": reason} for file, reason in summary.bad.items()]
    atomic_write_text(folder / f"{summary.stage}.json", json.dumps(record, indent=1) + "\n")
    summary.report = str(text)
    atomic_write_text(text, "\n".join(summary.lines(shown=None)) + "\n")
    return text
