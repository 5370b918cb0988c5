"""The checkpoint envelope (``swinssl.checkpoint``): one type writes and reads it."""

from __future__ import annotations

import pytest
import torch

from swinssl.checkpoint import Checkpoint, read_checkpoint, read_head
from swinssl.errors import CheckpointError


def envelope(**changes) -> Checkpoint:
    values = dict(kind="finetune", step=7, model={"w": torch.arange(3.0)}, plan={"network": {"feature_size": 12}},
                  optimizer={"state": {}}, scheduler={"last_epoch": 7}, rng={"torch": torch.get_rng_state()},
                  metrics={"loss": 0.5}, best={"dice": 0.75}, wall_s=12.5, world_size=2)
    return Checkpoint(**{**values, **changes})


def test_a_checkpoint_round_trips_and_its_file_holds_the_documented_keys(tmp_path):
    path = envelope().save(tmp_path / "last.pt")
    raw = read_checkpoint(path)
    assert raw["format"] == "swinssl" and raw["best_dice"] == 0.75 and raw["wall_s"] == 12.5  # the keys others read
    back = Checkpoint.load(path)
    assert (back.kind, back.step, back.best, back.wall_s, back.world_size) == ("finetune", 7, {"dice": 0.75}, 12.5, 2)
    assert torch.equal(back.model["w"], torch.arange(3.0)) and back.plan == {"network": {"feature_size": 12}}
    assert back.scheduler == {"last_epoch": 7} and back.metrics == {"loss": 0.5}
    assert envelope(best={}).to_dict().keys() == raw.keys() - {"best_dice"}  # a pre-training has no best


def test_the_head_reads_without_the_tensors(tmp_path):
    head = read_head(envelope().save(tmp_path / "last.pt"))
    assert (head.kind, head.step, head.plan, head.wall_s, head.world_size) == (
        "finetune", 7, {"network": {"feature_size": 12}}, 12.5, 2)
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")  # another layout says nothing
    assert read_head(tmp_path / "foreign.pt") == type(head)()


def test_another_layout_or_a_broken_envelope_is_refused_naming_the_file(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="foreign.pt: not a swinssl checkpoint"):
        Checkpoint.load(tmp_path / "foreign.pt")
    torch.save({"format": "swinssl", "model": {"w": "not a tensor"}}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="odd.pt: the checkpoint's 'model' is not a state dict of tensors"):
        Checkpoint.load(tmp_path / "odd.pt")
    torch.save({"format": "swinssl", "model": {}, "step": "seven"}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: malformed swinssl checkpoint"):
        Checkpoint.load(tmp_path / "bad.pt")
