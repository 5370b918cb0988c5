"""A pre-training step on two processes equals the step of one process on the concatenated batch, for
every method: the same logged losses on every process, and after DDP's average the same gradient.

Each process runs the pre-training stage's own ``losses`` (``engine.pretrain.PretrainStage.losses``) on its
half of the crops, with a stand-in for Fabric that gathers through a real gloo process group; the
reference is the same function with one process and all the crops. That covers what the equality
rests on: the crops gathered in rank order, the views drawn for the whole batch from a seed without the
rank, the model run on this process's rows only, and its outputs gathered back before the losses
(the cut-out's partner crop, the contrastive negatives and SwinFUSE's sampled tokens all range over
the whole batch). float64: the two sides add in different orders.
"""

import datetime
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import on_processes

from swinssl.config import load_config
from swinssl.engine.pretrain import PretrainStage
from swinssl.methods import get_method

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

WORLD, LOCAL = 2, 1  # processes, crops per process: every other crop of the batch is on the other process
# Small crops: 64 x 32 x 32 where the views allow it (the contrast task needs one side of 64); SwinMM's
# masked views permute axes, so its crops are cubes.
PRESETS = {
    "pretrain/swin_unetr_tiny": ["preprocess.roi_size=[64,32,32]"],
    "pretrain/swinmm_tiny": ["preprocess.roi_size=64"],
    "pretrain/swinfuse_tiny": ["preprocess.roi_size=[64,32,32]", "method.density_points=32"],
}
STEP, MICRO = 3, 1


class GlooFabric:
    """What the stage's ``losses`` asks of Fabric: rank, world size, device and ``all_gather``."""

    def __init__(self, rank: int, world_size: int):
        self.global_rank, self.world_size, self.device = rank, world_size, torch.device("cpu")

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)


def crops(preset: str) -> torch.Tensor:
    """The step's whole batch: WORLD * LOCAL crops in [0, 1] with some structure (a box of other values)."""
    size = load_config(preset, PRESETS[preset]).preprocess.roi_size
    g = torch.Generator().manual_seed(5)
    x = torch.rand(WORLD * LOCAL, 1, *size, generator=g, dtype=torch.float64) * 0.2
    for i in range(x.shape[0]):
        a, b, c = (torch.randint(0, s - 16, (1,), generator=g).item() for s in size)
        x[i, :, a : a + 16, b : b + 16, c : c + 16] += 0.6
    return x


def step_of(preset: str, x: torch.Tensor, fabric) -> tuple[dict, dict]:
    """({name: loss} logged by the step, {parameter: gradient of the total}) of this process."""
    cfg = load_config(preset, ["model.depths=[1,1,1,1]", *PRESETS[preset]])
    stage = SimpleNamespace(cfg=cfg, method=get_method(cfg.method.name), generator=torch.Generator())
    torch.manual_seed(0)
    model = stage.method.build_model(cfg).double()
    total, parts, _ = PretrainStage.losses(stage, model, {"image": x}, STEP, MICRO, fabric)
    total.backward()
    losses = {"loss": total.item(), **{k: v.item() for k, v in parts.items()}}
    return losses, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, port: int, preset: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        losses, grads = step_of(preset, crops(preset)[rank * LOCAL : (rank + 1) * LOCAL], GlooFabric(rank, WORLD))
        for g in grads.values():  # what DDP does to the gradients: their mean over the processes
            dist.all_reduce(g, op=dist.ReduceOp.SUM)
            g /= WORLD
        # As numpy arrays: a tensor would travel as shared memory that ends with this process.
        queue.put((rank, losses, {name: g.numpy() for name, g in grads.items()}))
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()


# The default suite checks Swin UNETR's (the views and negatives that range over the batch go through the
# same stage code for every method); SwinMM's 64^3 cubes and SwinFUSE's two streams run in the slow suite.
@pytest.mark.parametrize("preset", [p if "swin_unetr" in p else pytest.param(p, marks=pytest.mark.slow)
                                    for p in PRESETS])
def test_two_processes_step_as_one_process_on_the_whole_batch(preset):
    two = {rank: (losses, {name: torch.from_numpy(g) for name, g in grads.items()})
           for rank, losses, grads in on_processes(_rank, WORLD, preset)}
    losses, grads = step_of(preset, crops(preset), GlooFabric(0, 1))
    assert {"contrast", "inpaint", "rotate"} <= set(losses)
    for rank in range(WORLD):
        got_losses, got_grads = two[rank]
        assert got_losses.keys() == losses.keys()
        for name, value in losses.items():
            assert got_losses[name] == pytest.approx(value, rel=1e-9, abs=1e-12), (rank, name)
        assert got_grads.keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-7, atol=1e-10, msg=f"rank {rank}: {name}")
