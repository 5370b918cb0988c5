"""Corpus size as a non-event (issue 34): a start over an unchanged corpus reads no volume, the data
check remembers what it read, and the sampler visits every volume equally often with O(1) memory each."""

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_PRETRAIN, body_volume, write_nifti

from swinssl.config import load_config
from swinssl.data.check import check_dataset
from swinssl.data.discover import find_dataset
from swinssl.engine import pretrain as engine
from swinssl.engine.data import StepSampler, checksum_memo
from swinssl.runs import read_metrics
from swinssl.runtime import process_age_s

_OPENED: list[str] = []  # paths opened while a test watches (an audit hook cannot be removed)
_WATCHING: list[Path] = []


def _audit(event, args):
    if event == "open" and _WATCHING and isinstance(args[0], (str, bytes, Path)):
        path = str(args[0] if not isinstance(args[0], bytes) else args[0].decode(errors="replace"))
        if any(path.startswith(str(folder)) for folder in _WATCHING):
            _OPENED.append(path)


sys.addaudithook(_audit)


class reads_of:
    """Records every file opened under ``folder`` inside the block (any reader: open, os.open, gzip, mmap)."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()

    def __enter__(self):
        _OPENED.clear()
        _WATCHING.append(self.folder)
        return _OPENED

    def __exit__(self, *exc):
        _WATCHING.remove(self.folder)


@pytest.fixture
def corpus(tmp_path):
    """4 small CT volumes in a plain folder."""
    folder = tmp_path / "corpus"
    for i in range(4):
        write_nifti(folder / f"ct_{i}.nii.gz", body_volume((32, 32, 32), "CT", seed=i)[0], np.diag([2.0, 2.0, 2.0, 1]))
    return folder


def config(data, out, name, *extra):
    return load_config("pretrain/swin_unetr_tiny", [
        f"data={data}", f"train.out={out}", f"train.name={name}", *TINY_PRETRAIN, "preprocess.roi_size=[64,32,32]",
        "train.batch_size=2", "train.val_fraction=0", "train.preview_every=0", "train.steps=2",
        "train.checkpoint_every=2", *extra])


def test_a_start_and_a_resume_over_an_unchanged_corpus_read_no_volume(corpus, tmp_path):
    before = process_age_s()  # in-process: the run's process is this test session's
    first = engine.pretrain(config(corpus, tmp_path, "first"), progress=False)  # 2 steps x 2: all 4 volumes
    startup = [r for r in read_metrics(first) if r["name"] == "startup_s"]
    assert [r["step"] for r in startup] == [1] and before <= startup[0]["value"] <= process_age_s()
    with reads_of(corpus) as opened:
        engine.pretrain(config(corpus, tmp_path, "second"), progress=False)
        engine.pretrain(resume=first, overrides=["train.steps=4"], progress=False)
    assert opened == []
    # A changed file is read again (hashed for the manifest, then preprocessed), and only it.
    changed = corpus / "ct_2.nii.gz"
    write_nifti(changed, body_volume((32, 32, 32), "CT", seed=9)[0], np.diag([2.0, 2.0, 2.0, 1]))
    with reads_of(corpus) as opened:
        engine.pretrain(config(corpus, tmp_path, "third"), progress=False)
    assert opened and {Path(p).name for p in opened} == {"ct_2.nii.gz"}
    assert any(checksum_memo(config(corpus, tmp_path, "x")).glob("*.json"))


def test_data_check_remembers_what_it_read(corpus, tmp_path):
    (corpus / "broken.nii.gz").write_bytes(b"\x1f\x8b not gzip")
    dataset, memo = find_dataset(corpus), tmp_path / "checks"
    reports, problems = check_dataset(dataset, memo=memo)
    with reads_of(corpus) as opened:
        again = check_dataset(find_dataset(corpus), memo=memo)
    assert opened == [] and again == (reports, problems)
    assert len(reports) == 4 and len(problems) == 1 and "broken.nii.gz" in problems[0]
    write_nifti(corpus / "broken.nii.gz", body_volume((32, 32, 32), "CT", seed=5)[0])  # fixed: read again
    with reads_of(corpus) as opened:
        fixed_reports, fixed_problems = check_dataset(find_dataset(corpus), memo=memo)
    assert {Path(p).name for p in opened} == {"broken.nii.gz"}
    assert len(fixed_reports) == 5 and fixed_problems == []


def test_sampler_visits_every_one_of_1000_files_equally_often_disjoint_across_ranks(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    header = write_nifti(folder / "ct_0000.nii.gz", np.zeros((2, 2, 2), np.int16)).read_bytes()
    for i in range(1, 1000):  # 1,000 tiny files: the sampler's bookkeeping, not their voxels
        (folder / f"ct_{i:04d}.nii.gz").write_bytes(header)
    cases = find_dataset(folder).cases
    assert len(cases) == 1000
    world, per_step, epochs = 2, 4, 5
    steps = epochs * len(cases) // (world * per_step)
    ranks = [list(StepSampler(len(cases), per_step, seed=3, rank=r, steps=steps, world_size=world))
             for r in range(world)]
    seen = np.zeros(len(cases), int)
    for step in range(steps):
        both = [ranks[r][step * per_step + i][0] for r in range(world) for i in range(per_step)]
        assert len(set(both)) == len(both)  # a step's volumes: disjoint across ranks, none twice
        seen[both] += 1
        epoch_end = (step + 1) * world * per_step % len(cases) == 0
        if epoch_end:  # each pass over the data sees every volume exactly once
            assert (seen == (step + 1) * world * per_step // len(cases)).all()
    assert (seen == epochs).all()
    again = list(StepSampler(len(cases), per_step, seed=3, rank=1, steps=steps, world_size=world))
    other = list(StepSampler(len(cases), per_step, seed=4, rank=1, steps=steps, world_size=world))
    assert again == ranks[1] and [c for c, _ in other] != [c for c, _ in ranks[1]]
    sampler = StepSampler(len(cases), per_step, seed=3, steps=steps)
    list(sampler)
    assert sampler._order.nbytes <= 8 * len(cases)  # one pass's order held, not one per pass


def test_prepare_then_pretraining_skips_exactly_what_prepare_found_bad_and_says_so(tmp_path, capsys):
    from swinssl.data.prepare import prepare

    data = tmp_path / "mixed"
    for i in range(4):
        write_nifti(data / f"ct_{i}.nii.gz", body_volume((32, 32, 32), "CT", seed=i)[0], np.diag([2.0, 2.0, 2.0, 1]))
    (data / "truncated.nii.gz").write_bytes((data / "ct_0.nii.gz").read_bytes()[:300])
    nan = body_volume((32, 32, 32), "CT", seed=7)[0]
    nan[5, 5, 5] = np.nan
    bad = {str(data / "truncated.nii.gz"), str(write_nifti(data / "nan.nii.gz", nan)),
           str(write_nifti(data / "flat.nii.gz", np.ones((32, 32), np.float32)))}
    cfg = config(data, tmp_path, "after", "data.modality=CT", "data.max_bad_fraction=0.5", "train.steps=3",
                 "train.checkpoint_every=3")
    summary = prepare(cfg, progress=False)
    assert set(summary.bad) == bad and summary.built == 4
    with reads_of(data) as opened:
        run = engine.pretrain(cfg, progress=False)
    assert not set(opened) & bad  # skipped from prepare's records, never opened
    skipped = [__import__("json").loads(line)["file"] for line in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted(skipped) == sorted(bad)
    err = capsys.readouterr().err
    assert err.count("swinssl data prepare found bad") == 1 and "3 volume(s)" in err
