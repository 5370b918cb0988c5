"""Numerical faults, failed checkpoint writes, unwritable outputs and determinism of the
training engine (tiny pre-training on phantoms, CPU)."""

import errno

import pytest
import torch
from conftest import TINY_PRETRAIN
from typer.testing import CliRunner

from swinssl.cli import app
from swinssl.config import load_config
from swinssl.engine import pretrain as engine
from swinssl.engine import runner
from swinssl.checkpoint import read_checkpoint
from swinssl.runs import read_metrics
from swinssl.errors import OutputError, TrainingError
from swinssl.utils import writable_dir

# One volume per step, a checkpoint after every step, validation only at the end.
TINY = [*TINY_PRETRAIN, "train.batch_size=1", "train.val_every=100", "train.preview_every=100",
        "train.checkpoint_every=1"]


def config(data, out, name, *extra):
    return load_config("pretrain/swin_unetr_tiny", [f"data={data}", f"train.out={out}", f"train.name={name}",
                                                    *TINY, *extra])


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def poison_steps(monkeypatch, calls_to_poison):
    """Make the given calls (1-based) of the method's losses give NaN gradients."""
    method = engine.get_method("swin_unetr")
    real = method.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        total, parts, previews = real(*args, **kwargs)
        if calls["n"] in calls_to_poison:
            total = NanGradient.apply(total)
        return total, parts, previews

    monkeypatch.setattr(method, "compute_losses", poisoned)


def test_nonfinite_gradients_stop_the_run_and_keep_the_last_checkpoint(phantoms, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    with pytest.raises(TrainingError, match=r"step 2: gradient norm is nan; the last good checkpoint is .*last.pt"):
        engine.pretrain(config(phantoms, tmp_path, "stop", "train.steps=4"), progress=False)
    ckpt = read_checkpoint(tmp_path / "stop" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_skip_mode_skips_the_bad_step_without_touching_the_weights(phantoms, tmp_path, monkeypatch):
    from swinssl.checkpoint import Checkpoint

    saved = {}
    real_save = Checkpoint.save

    def remember(checkpoint, path):  # the weights after every step
        saved[checkpoint.step] = {k: v.clone() for k, v in checkpoint.model.items()}
        return real_save(checkpoint, path)

    monkeypatch.setattr(Checkpoint, "save", remember)
    poison_steps(monkeypatch, {3})
    engine.pretrain(config(phantoms, tmp_path, "skip", "train.steps=4", "train.on_nonfinite=skip"), progress=False)
    assert sorted(saved) == [1, 2, 3, 4]
    for key, before in saved[2].items():  # step index 2 (the third) was skipped: no update at all
        assert torch.equal(saved[3][key], before), key
    assert any(not torch.equal(saved[4][k], v) for k, v in saved[3].items())  # and training went on
    assert all(torch.isfinite(v).all() for v in saved[4].values())
    skipped = {r["step"]: r["value"] for r in read_metrics(tmp_path / "skip") if r["name"] == "skipped_steps"}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1}


def test_skip_mode_stops_when_bad_steps_keep_coming(phantoms, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "MAX_SKIPPED_IN_A_ROW", 1)
    poison_steps(monkeypatch, {2, 3})
    with pytest.raises(TrainingError, match=r"step 2: gradient norm is nan, 2 steps in a row"):
        engine.pretrain(config(phantoms, tmp_path, "diverged", "train.steps=4", "train.on_nonfinite=skip"),
                        progress=False)
    assert read_checkpoint(tmp_path / "diverged" / "checkpoints" / "last.pt")["step"] == 2


def test_full_disk_during_a_checkpoint_write_keeps_the_previous_checkpoint(phantoms, tmp_path, monkeypatch):
    import swinssl.checkpoint as checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def disk_fills_up(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04 partial")  # some bytes reach the disk, then it is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_fills_up)
    with pytest.raises(TrainingError, match=r"last.pt: cannot write the checkpoint \(No space left on device\); "
                                             r"the previous checkpoint there is unchanged"):
        engine.pretrain(config(phantoms, tmp_path, "full_disk", "train.steps=3"), progress=False)
    monkeypatch.undo()
    checkpoints = tmp_path / "full_disk" / "checkpoints"
    assert read_checkpoint(checkpoints / "last.pt")["step"] == 1
    assert [p.name for p in checkpoints.iterdir()] == ["last.pt"]  # no temporary left behind


def test_same_seed_and_config_give_bitwise_identical_weights(phantoms, tmp_path):
    runs = [engine.pretrain(config(phantoms, tmp_path, name, "train.steps=2"), progress=False) for name in "ab"]
    a, b = (read_checkpoint(run / "checkpoints" / "last.pt")["model"] for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = engine.pretrain(config(phantoms, tmp_path, "c", "train.steps=2", "seed=1"), progress=False)
    c = read_checkpoint(other / "checkpoints" / "last.pt")["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the comparison can tell runs apart


@pytest.mark.parametrize("command", ["pretrain", "finetune", "predict", "evaluate", "phantom"])
def test_unwritable_output_folder_fails_first_with_exit_code_5(phantoms, tmp_path, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("in the way")
    out = blocker / "out"
    args = {
        "pretrain": ["pretrain", "--no-estimate", f"data={phantoms}", f"train.out={out}"],
        "finetune": ["finetune", "--no-estimate", f"data={phantoms}", f"train.out={out}"],
        # The model does not exist either: the output folder is checked before anything is loaded.
        "predict": ["predict", str(tmp_path / "no_model"), str(phantoms), "--out", str(out)],
        "evaluate": ["evaluate", str(phantoms / "labelsTr"), str(phantoms), "--out", str(out)],
        "phantom": ["phantom", "--out", str(out), "--cases", "1", "--size", "32"],
    }[command]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 5, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {out}")  # the run directory is under it
    assert lines[0].endswith(": cannot write output here (Not a directory)")
    assert blocker.read_text() == "in the way"


def test_writable_dir_reports_a_read_only_folder(tmp_path, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OutputError, match=rf"^{tmp_path}: cannot write output here \(Permission denied\)$"):
        writable_dir(tmp_path)
