"""``swinssl data prepare`` and the cache's claims, bad records and float16 entries.

A folder of good volumes, a truncated file, a NaN volume and a 2D image: the report lists exactly the
three bad ones, a rerun reads nothing and still lists them, a rewritten file is examined again; two
processes preparing one folder build every entry once; a claim of a dead process is taken over, a
live one waited for; float16 entries read back as float32 within float16's rounding.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN, body_volume, write_nifti
from typer.testing import CliRunner

import swinssl.data.cache as cache_module
import swinssl.data.checksums as checksums_module
from swinssl.cli import app
from swinssl.config import load_config
from swinssl.data.cache import CachedPrefixd, Claim, KnownBad, claim_file, prepared_bad, stale_claim, take_over
from swinssl.data.prepare import prepare, stage_head, stage_items
from swinssl.data.transforms import Pipeline, RandCropsd, finetune_transforms, pretrain_transforms
from swinssl.errors import DataError

GOOD = 3


def mixed_folder(folder: Path) -> tuple[list[Path], dict[str, Path]]:
    """``GOOD`` body volumes of 32^3 plus a truncated .nii.gz, a NaN volume and a 2D image in
    ``folder``; returns (good files, {kind: bad file})."""
    good = [write_nifti(folder / f"good_{i}.nii.gz", body_volume((32, 32, 32), seed=i)[0]) for i in range(GOOD)]
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(good[0].read_bytes()[:300])
    nan_image = body_volume((32, 32, 32), seed=9)[0]
    nan_image[3, 3, 3] = np.nan
    bad = {"truncated": truncated, "nan": write_nifti(folder / "nan.nii.gz", nan_image),
           "flat": write_nifti(folder / "flat.nii.gz", np.ones((32, 32), np.float32))}
    return good, bad


def config(data: Path, out: Path, *extra: str):
    return load_config("pretrain/swin_unetr_tiny", [f"data={data}", f"train.out={out}", "data.modality=CT",
                                                     *TINY_PRETRAIN, *extra])


@pytest.fixture
def mixed(tmp_path):
    good, bad = mixed_folder(tmp_path / "data")
    return tmp_path / "data", good, bad


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "entries").iterdir() if not p.name.startswith("."))


def reasons_ok(bad: dict[str, str], files: dict[str, Path]) -> None:
    assert set(bad) == {str(p) for p in files.values()}
    assert "cannot read" in bad[str(files["truncated"])]
    assert "non-finite" in bad[str(files["nan"])]
    assert "3D" in bad[str(files["flat"])]
    assert all("\n" not in reason and reason.startswith(file) for file, reason in bad.items())


# --- prepare over a mixed folder -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_lists_exactly_the_bad_volumes_and_training_finds_every_good_entry(mixed, tmp_path, monkeypatch,
                                                                                    workers):
    data, good, bad = mixed
    cfg = config(data, tmp_path / "out")
    summary = prepare(cfg, workers=workers, progress=False)

    root = tmp_path / "out" / "cache"
    reasons_ok(summary.bad, bad)
    assert (summary.volumes, summary.cached, summary.built, summary.failures) == (6, 0, GOOD, 3)
    assert summary.bytes_read >= sum(p.stat().st_size for p in good)
    assert len(entries(root)) == GOOD and not list((root / "entries").glob("*.building*"))
    assert summary.cache_bytes == sum(f.stat().st_size for e in (root / "entries").iterdir() for f in e.iterdir())
    report = json.loads((root / "prepare" / "pretrain.json").read_text())
    assert {b["file"]: b["reason"] for b in report["bad"]} == summary.bad and report["built"] == GOOD
    text = (root / "prepare" / "pretrain.txt").read_text()
    assert all(reason in text for reason in summary.bad.values())
    # The pre-training pipeline finds every good volume's entry: its head never runs.
    pipeline = pretrain_transforms(cfg.preprocess, channels=cfg.model.in_channels, cache=root)
    head = next(t for t in pipeline.transforms if isinstance(t, CachedPrefixd))
    monkeypatch.setattr(head, "head", lambda d: pytest.fail(f"{d['image']} was preprocessed again"))
    items = {i["image"]: i for i in stage_items(cfg, "pretrain")[0]}
    for file in good:
        assert pipeline(dict(items[str(file)]))[0]["image"].shape == (1, 64, 64, 64)
    for file in bad.values():  # a bad volume is refused from its record, unread
        with pytest.raises(KnownBad):
            pipeline(dict(items[str(file)]))


def test_rerun_reads_no_volume_builds_nothing_and_still_lists_the_bad_ones(mixed, tmp_path, monkeypatch):
    data, _, bad = mixed
    cfg = config(data, tmp_path / "out")
    prepare(cfg, progress=False)
    monkeypatch.setattr(checksums_module, "sha256_file", lambda p: pytest.fail(f"{p} hashed again"))
    monkeypatch.setattr(CachedPrefixd, "_run_head", lambda self, item: pytest.fail(f"{item['image']} read again"))

    again = prepare(cfg, progress=False)

    reasons_ok(again.bad, bad)
    assert (again.cached, again.built, again.bytes_read) == (GOOD, 0, 0)
    assert json.loads((tmp_path / "out" / "cache" / "prepare" / "pretrain.json").read_text())["failures"] == 3


def test_a_rewritten_bad_file_is_examined_again(mixed, tmp_path):
    data, _, bad = mixed
    cfg = config(data, tmp_path / "out")
    prepare(cfg, progress=False)
    write_nifti(bad["nan"], body_volume((32, 32, 32), seed=5)[0])  # fixed
    write_nifti(bad["flat"], np.ones((16, 16), np.float32))  # rewritten, still 2D

    again = prepare(cfg, progress=False)

    assert set(again.bad) == {str(bad["truncated"]), str(bad["flat"])} and "(16, 16)" in again.bad[str(bad["flat"])]
    assert again.built == 1 and len(entries(tmp_path / "out" / "cache")) == GOOD + 1


def test_prepared_bad_ignores_a_record_whose_file_changed(mixed, tmp_path):
    data, good, bad = mixed
    prepare(config(data, tmp_path / "out"), progress=False)
    root = tmp_path / "out" / "cache"
    files = [*good, *bad.values()]
    assert prepared_bad(root, files) == prepare(config(data, tmp_path / "out"), progress=False).bad

    os.utime(bad["nan"], ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, new mtime: examined again
    found = prepared_bad(root, files)
    assert set(found) == {str(bad["truncated"]), str(bad["flat"])}
    assert prepared_bad(root, [bad["flat"]], labelled=True) == {}  # fine-tuning's records are others
    assert prepared_bad(root, [bad["flat"]], settings="another head") == {}


def test_finetuning_prepare_builds_the_entries_finetuning_reads(small_phantoms, tmp_path, monkeypatch):
    cfg = load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}", "preprocess.spacing=null"])
    summary = prepare(cfg, stage="finetune", progress=False)

    items, classes = stage_items(cfg, "finetune")
    assert summary.built == len(items) and all(i["label"] for i in items) and not summary.bad
    pipeline = finetune_transforms(cfg.preprocess, classes=classes, channels=1, train=False, cache=tmp_path / "cache")
    head = pipeline.transforms[0]
    monkeypatch.setattr(head, "head", lambda d: pytest.fail("preprocessed again"))
    out = pipeline(dict(items[0]))
    assert out["label"].shape == out["image"].shape and out["image"].dtype == torch.float32


# --- several processes on one cache folder ----------------------------------------------------------------


# A process running prepare whose head appends which volume it preprocesses (and by whom) to a log and
# takes its time, so that two such processes really overlap; it starts once the test says go.
CHILD = """
import json, os, sys, time
from pathlib import Path
from swinssl.config import load_config
from swinssl.data.cache import CachedPrefixd
from swinssl.data.prepare import prepare

log, ready, go, overrides = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
real = CachedPrefixd._run_head

def run_head(self, item):
    with open(log, "a") as f:  # O_APPEND: one short line per write, never interleaved
        f.write(f"{os.getpid()} {item['image']}\\n")
    time.sleep(0.3)
    return real(self, item)

CachedPrefixd._run_head = run_head
cfg = load_config("pretrain/swin_unetr_tiny", overrides)
ready.touch()
while not go.exists():
    time.sleep(0.01)
summary = prepare(cfg, workers=1, progress=False)
print(json.dumps({"built": summary.built, "bad": summary.bad}))
"""


def test_two_processes_on_one_folder_build_every_entry_once(mixed, tmp_path):
    data, good, bad = mixed
    log, go = tmp_path / "heads.log", tmp_path / "go"
    overrides = [f"data={data}", f"train.out={tmp_path / 'out'}", "data.modality=CT", *TINY_PRETRAIN]
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(log), str(tmp_path / f"ready_{i}"), str(go),
                                  json.dumps(overrides)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready_{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start together
    found = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        found.append(json.loads(out.splitlines()[-1]))

    runs = [line.split(" ", 1) for line in log.read_text().splitlines()]
    assert collections.Counter(file for _, file in runs) == {str(p): 1 for p in [*good, *bad.values()]}
    assert len({pid for pid, _ in runs}) == 2  # both worked: the volumes were split, not done twice
    assert sum(f["built"] for f in found) == GOOD
    for f in found:  # each process ends with the whole bad list
        reasons_ok(f["bad"], bad)
    assert len(entries(tmp_path / "out" / "cache")) == GOOD


# --- claims -----------------------------------------------------------------------------------------------


@pytest.fixture
def one_volume(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", body_volume((32, 32, 32))[0])
    cfg = config(tmp_path, tmp_path / "out")
    head = stage_head(cfg, "pretrain", tmp_path / "cache")
    item = {"image": str(path), "label": None, "modality": "CT", "case_id": "v"}
    entry = head.entry(head.key(item))
    entry.parent.mkdir(parents=True, exist_ok=True)
    return head, item, entry


def write_claim(entry: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = claim_file(entry)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": None, "time": time.time(), "token": "theirs"}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def ensure_in_thread(head, item) -> tuple[threading.Thread, dict]:
    result = {}

    def run():
        try:
            result["status"] = head.ensure(item, wait=True)
        except Exception as err:  # noqa: BLE001 - reported by the test
            result["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("holder", ["dead process here", "old claim elsewhere"])
def test_a_stale_claim_is_taken_over(one_volume, monkeypatch, holder):
    head, item, entry = one_volume
    monkeypatch.setattr(cache_module, "CLAIM_TIMEOUT_S", 60.0)
    claim = (write_claim(entry, cache_module.HOST, dead_pid()) if holder == "dead process here"
             else write_claim(entry, "another-node", 1, age_s=120.0))

    thread, result = ensure_in_thread(head, item)
    thread.join(timeout=10)

    try:
        assert not thread.is_alive(), "waited for a stale claim"
        assert result == {"status": "built"} and (entry / "meta.json").is_file() and not claim.exists()
    finally:
        claim.unlink(missing_ok=True)  # lets a stuck waiter go


def test_a_live_claim_is_waited_for_then_its_entry_read(one_volume, tmp_path, monkeypatch):
    head, item, entry = one_volume
    claim = write_claim(entry, cache_module.HOST, os.getpid())  # this process: alive
    other = write_claim(entry.with_name("x"), "another-node", 1)  # a fresh claim elsewhere: alive too
    assert stale_claim(claim) is None and stale_claim(other) is None
    ran = []
    monkeypatch.setattr(head, "head", lambda d: ran.append(d) or pytest.fail("built under another's claim"))
    assert head.ensure(item, wait=False) == "claimed"

    thread, result = ensure_in_thread(head, item)
    time.sleep(1.0)
    assert thread.is_alive() and not ran and not entry.exists()  # waiting, not building
    # The holder finishes: its entry appears whole (built elsewhere and renamed in, as a builder does).
    elsewhere = stage_head(config(tmp_path, tmp_path / "out"), "pretrain", tmp_path / "cache2")
    assert elsewhere.ensure(item) == "built"
    os.rename(elsewhere.entry(elsewhere.key(item)), entry)
    thread.join(timeout=10)
    claim.unlink()
    assert result == {"status": "present"} and not ran


def test_a_released_claim_lets_the_waiter_build(one_volume):
    head, item, entry = one_volume
    held = Claim.take(entry)
    assert held is not None and Claim.take(entry) is None  # exclusive
    thread, result = ensure_in_thread(head, item)
    time.sleep(0.6)
    assert thread.is_alive()
    held.release()
    thread.join(timeout=10)
    assert result == {"status": "built"} and not claim_file(entry).exists()


def test_take_over_leaves_a_claim_that_replaced_the_stale_one(tmp_path):
    path = tmp_path / "k.building"
    path.write_text("new holder")
    take_over(path, "the stale text read earlier")
    assert path.read_text() == "new holder"
    take_over(path, "new holder")
    assert not path.exists() and not (tmp_path / "k.building.takeover").exists()


# --- float16 entries --------------------------------------------------------------------------------------


def test_float16_entries_read_back_as_float32_within_rounding_and_are_other_entries(mixed, tmp_path):
    data, good, _ = mixed
    cfg = config(data, tmp_path / "out")
    prepare(cfg, progress=False)
    summary16 = prepare(config(data, tmp_path / "out", "data.cache_dtype=float16"), progress=False)
    root = tmp_path / "out" / "cache"
    assert summary16.built == GOOD and len(entries(root)) == 2 * GOOD  # float16 entries are others
    item = {"image": str(good[0]), "label": None, "modality": "CT", "case_id": "g"}
    head32 = stage_head(cfg, "pretrain", root)
    head16 = head32.with_dtype("float16")
    default = pretrain_transforms(cfg.preprocess, cache=root).transforms[0]  # as training builds it
    assert head32.key(item) == default.key(item) != head16.key(item)  # float32 keys are the keys they were
    stored = np.load(head16.entry(head16.key(item)) / "image.npy")
    assert stored.dtype == np.float16
    assert np.load(head32.entry(head32.key(item)) / "image.npy").dtype == np.float32

    whole32, whole16 = (CachedPrefixd(h.head, root, h.settings_of_head, dtype=h.dtype)(dict(item))["image"]
                        for h in (head32, head16))
    assert whole16.dtype == torch.float32 and not torch.equal(whole16, whole32)
    torch.testing.assert_close(whole16, whole32, rtol=0, atol=2.0**-12)  # [0, 1]: half of float16's spacing below 1
    crops = Pipeline([head16, RandCropsd((16, 16, 16), 2)])  # pre-training's tail on memory-mapped float16
    crops.set_random_state(seed=0)
    assert crops(dict(item))[0]["image"].dtype == torch.float32


def test_float16_keeps_labels_exact(small_phantoms, tmp_path):
    outs = {}
    for dtype in ("float32", "float16"):
        cfg = load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}",
                                            "preprocess.spacing=null", f"data.cache_dtype={dtype}"])
        prepare(cfg, stage="finetune", progress=False)
        items, classes = stage_items(cfg, "finetune")
        head = stage_head(cfg, "finetune", tmp_path / "cache", classes)
        outs[dtype] = CachedPrefixd(head.head, head.root, head.settings_of_head, dtype=dtype)(dict(items[0]))
    assert torch.equal(outs["float16"]["label"].as_tensor(), outs["float32"]["label"].as_tensor())
    assert outs["float16"]["image"].dtype == torch.float32


# --- the command ------------------------------------------------------------------------------------------


def test_cli_prepares_and_prints_the_summary(mixed, tmp_path):
    data, _, bad = mixed
    result = CliRunner().invoke(app, ["data", "prepare", "pretrain/swin_unetr_tiny", f"data={data}",
                                      f"train.out={tmp_path / 'out'}", "data.modality=CT", *TINY_PRETRAIN])
    assert result.exit_code == 0, result.output
    assert f"6 volumes (pretrain)" in result.output and f"{GOOD} built" in result.output and "3 bad" in result.output
    assert all(str(p) in result.output for p in bad.values())


@pytest.mark.parametrize("args, code, message", [
    (["data.cache=off"], 2, "error: data.cache=off: swinssl data prepare fills the preprocessing cache"),
    (["--stage", "probe"], 2, "error: --stage 'probe': expected one of pretrain, finetune"),
    (["--workers", "0"], 2, "error: --workers 0: at least 1 process"),
    (["data=/no/such/folder"], 3, "error: /no/such/folder: no such file or folder"),
])
def test_cli_refuses_in_one_line(mixed, tmp_path, args, code, message):
    data, _, _ = mixed
    result = CliRunner().invoke(app, ["data", "prepare", f"data={data}", f"train.out={tmp_path / 'out'}", *args])
    assert result.exit_code == code, result.output
    assert result.output.strip() == message or result.output.strip().startswith(message)
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_cli_finetune_prepare_adopts_the_pretrained_plans_input(small_phantoms, tmp_path, monkeypatch):
    from dataclasses import replace

    from swinssl.checkpoint import save_checkpoint

    plan = {"preprocess": {"spacing": [2.0, 2.0, 2.0], "ct_window": [-500.0, 500.0]}}
    pretrained = save_checkpoint(tmp_path / "pre.pt", {"kind": "pretrain", "step": 1, "plan": plan, "model": {}})
    overrides = [f"data={small_phantoms}", f"train.out={tmp_path}", f"finetune.pretrained={pretrained}"]
    result = CliRunner().invoke(app, ["data", "prepare", "finetune/tiny", *overrides, "--stage", "finetune"])
    assert result.exit_code == 0, result.output
    assert "adopting the preprocessing of the pre-trained plan" in result.output

    cfg = load_config("finetune/tiny", overrides)
    items, classes = stage_items(cfg, "finetune")
    adopted = replace(cfg.preprocess, spacing=(2.0, 2.0, 2.0), ct_window=(-500.0, 500.0))  # as fine-tuning adopts
    head = finetune_transforms(adopted, classes=classes, train=False, cache=tmp_path / "cache").transforms[0]
    monkeypatch.setattr(head, "head", lambda d: pytest.fail("fine-tuning would preprocess again"))
    assert all(head(dict(i))["image"].dtype == torch.float32 for i in items)
