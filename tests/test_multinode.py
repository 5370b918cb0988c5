"""A 2-node x 1-process CPU fine-tuning (gloo, two ``torchrun`` launchers on localhost) trains exactly as one
process does on the concatenated batch: same logged losses, same final weights. Both runs read one cache
folder that two ``swinssl data prepare`` processes filled at once (as two nodes would): every entry is
built once, by one of them, and neither training builds one. A 2-node pre-training does the same on a
shared pre-training cache, and equals one process on the doubled batch too.

That holds because a step's data are defined globally (``engine.data.StepSampler``: rank r takes positions
r*B .. (r+1)*B-1 of the step's world*B), the DiceCE loss is a mean over equal-sized crops (so the mean of
the ranks' means is the global mean, and DDP's averaged gradient is the global gradient), and everything
else (model init, optimiser, schedule, clipping) is the same on every rank. Pre-training draws its views
for the step's whole batch and computes its losses on the gathered outputs
(``engine.pretrain.PretrainStage.losses``; one step of every method: tests/test_pretrain_processes.py).

Both runs go through a small wrapper of the CLI that records its pid (so the test can end what it started),
and run in float64 (``train.precision=64-true``): see ``WEIGHTS_RTOL``.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from swinssl.checkpoint import read_checkpoint
from swinssl.runs import read_metrics

dist = pytest.importorskip("torch.distributed")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

JOB_LIMIT_S = 120  # past this a run hangs: the test fails (and kills what it started)
STEPS = 2

# Why float64 and not the float32 the runs use by default: one process summing a batch of 2 and DDP
# averaging two batches of 1 add in different orders, so float32 gradients differ by up to ~1e-3 of
# the largest gradient of a tensor. AdamW's first steps are nearly sign(g) * lr, so every element whose
# gradient is that small moves by a different ~lr (1e-3) per step: in float32, ~30% of the weights of
# this tiny model differed by up to 3e-3 after 3 steps (while the logged losses agreed to 6 digits), as
# much as a wrong crop would move them. In float64 the gradients agree to ~1e-14 relative and the weights to
# < 1e-9 (AdamW's 1/(sqrt(v) + 1e-8) still amplifies tiny gradients' rounding): the tolerances leave
# 100x room, and are 10^4 below what one wrong crop of 2 does (~1e-3 per weight, ~0.2% on the loss).
WEIGHTS_RTOL, WEIGHTS_ATOL = 1e-6, 1e-7
# metrics.csv keeps 6 significant digits (MetricLogger writes f"{value:.6g}"): a rounding step of 5e-6 relative.
LOSS_RTOL, LOSS_ATOL = 2e-5, 1e-8

WRAPPER = '''\
"""The swinssl CLI for the multi-node test, recording its pid."""
import os
import sys

with open(os.path.join(os.environ["MULTINODE_PIDS"], f"{os.getpid()}.pid"), "w") as f:
    f.write(str(os.getpid()))

from swinssl.cli import main  # noqa: E402

sys.exit(main())
'''

TINY = [
    "model.feature_size=12", "model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1",
    "train.num_workers=0", "train.log_every=1", f"train.steps={STEPS}", "train.warmup_steps=1",
    "train.val_fraction=0", f"train.checkpoint_every={STEPS}", "train.accelerator=cpu", "train.devices=1",
    "train.precision=64-true",
]

PRETRAIN_TINY = [
    "model.feature_size=12", "model.depths=[1,1,1,1]", "preprocess.roi_size=[64,32,32]", "preprocess.num_crops=1",
    "preprocess.spacing=null", "train.num_workers=0", "train.log_every=1", f"train.steps={STEPS}",
    "train.warmup_steps=1", "train.val_fraction=0", f"train.checkpoint_every={STEPS}", "train.accelerator=cpu",
    "train.devices=1", "train.preview_every=0", "train.precision=64-true",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """4 phantoms of 32^3: 3 labelled training cases (no validation split), so the 2nd step's 2 crops come from
    2 passes over the data (rank 0 ends the first pass, rank 1 starts the second)."""
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=4, size=32, seed=2)
    return out / "dataset.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def run_all(commands: list[list[str]], tmp_path: Path, name: str, threads: int) -> None:
    """Run ``commands`` at once (each with its own log, ``threads`` torch threads) and wait for all; kill what
    is left after JOB_LIMIT_S."""
    pids = tmp_path / f"pids_{name}"
    pids.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
                        "MASTER_ADDR", "MASTER_PORT") and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env.update(OMP_NUM_THREADS=str(threads), MULTINODE_PIDS=str(pids))
    logs = [tmp_path / f"{name}_{i}.log" for i in range(len(commands))]
    jobs = []
    try:
        for command, log in zip(commands, logs):
            with open(log, "w") as out:  # a file, not a pipe: a process left behind would hang the reader
                jobs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path))
        deadline = time.monotonic() + JOB_LIMIT_S
        for job in jobs:
            job.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        # torchrun starts its workers in their own sessions: end them by the pids they recorded.
        for job in jobs:
            if job.poll() is None:
                job.kill()
                job.wait()
        for pid in (int(f.read_text()) for f in pids.glob("*.pid")):
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-6000:]}" for log in logs)
    assert all(job.returncode == 0 for job in jobs), f"{name}: exit codes {[j.returncode for j in jobs]}\n{tails}"


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["value"]) for r in read_metrics(run_dir) if r["split"] == "train" and r["name"] == "loss"]


def prepare_on_two_nodes(wrapper: Path, tmp_path: Path, name: str, overrides: list[str], stage: str) -> dict:
    """Two ``data prepare`` processes at once on one cache folder (``data.cache`` in ``overrides``); each
    entry's meta.json modification time (ns) after both."""
    cache = Path(next(o for o in overrides if o.startswith("data.cache=")).split("=", 1)[1])
    prepare = [sys.executable, str(wrapper), "data", "prepare", *overrides, "--stage", stage, "--workers", "1"]
    run_all([prepare, prepare], tmp_path, name, threads=1)
    built = [int(re.search(r" cached, (\d+) built, ", (tmp_path / f"{name}_{i}.log").read_text()).group(1))
             for i in range(2)]
    entries = cache_entries(cache)
    assert entries
    assert sum(built) == len(entries), f"{name}: built {built} for {len(entries)} entries: one was built twice"
    assert not list((cache / "entries").glob("*.building"))  # every claim released
    return entries


def cache_entries(cache: Path) -> dict:
    return {p.name: (p / "meta.json").stat().st_mtime_ns for p in (cache / "entries").iterdir()
            if not p.name.startswith(".")}


def test_two_nodes_train_as_one_process_on_the_concatenated_batch(phantoms, tmp_path):
    wrapper = tmp_path / "multinode_swinssl.py"
    wrapper.write_text(WRAPPER)
    shared = tmp_path / "shared_cache"
    data = [*TINY, f"data={phantoms}", f"data.cache={shared}"]
    prepared = prepare_on_two_nodes(wrapper, tmp_path, "prepare", ["finetune/tiny", *data], "finetune")
    common = ["finetune", "--config", "finetune/tiny", *data, f"train.out={tmp_path / 'runs'}"]

    port = free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
              str(wrapper), *common, "train.name=nodes", "train.batch_size=1", "train.num_nodes=2",
              "train.strategy=ddp"] for rank in (0, 1)]
    run_all(nodes, tmp_path, "nodes", threads=1)
    single = [sys.executable, str(wrapper), *common, "train.name=single", "train.batch_size=2", "train.num_nodes=1"]
    run_all([single], tmp_path, "single", threads=1)

    assert cache_entries(shared) == prepared  # both trainings read what prepare built, and built nothing
    assert not (tmp_path / "runs" / "nodes" / "checkpoints" / "best.pt").exists()  # no validation ran
    assert_same_training(tmp_path / "runs" / "nodes", tmp_path / "runs" / "single")


def assert_same_training(two: Path, one: Path) -> None:
    """The runs in ``two`` (2 nodes) and ``one`` (one process) logged the same losses and ended with the same
    weights (see WEIGHTS_RTOL)."""
    import torch

    losses_two, losses_one = train_losses(two), train_losses(one)
    assert [s for s, _ in losses_two] == [s for s, _ in losses_one] == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor([v for _, v in losses_two], dtype=torch.float64),
                               torch.tensor([v for _, v in losses_one], dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=LOSS_ATOL, msg=lambda m: f"train losses per step differ:\n{m}")
    a, b = (read_checkpoint(run / "checkpoints" / "last.pt") for run in (two, one))
    assert a["step"] == b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for key, value in b["model"].items():
        assert value.dtype == torch.float64 or not value.is_floating_point(), key  # train.precision=64-true took effect
        torch.testing.assert_close(a["model"][key], value, rtol=WEIGHTS_RTOL, atol=WEIGHTS_ATOL, msg=key)


@pytest.mark.slow  # the default suite is near its 10 minutes; the fine-tuning test above shares a prepared cache too
def test_two_nodes_pretrain_as_one_process_on_a_cache_both_prepared(tmp_path):
    """Pre-training on two nodes from one shared cache: prepared by both at once, read by both, no entry built
    twice or by the training; the same losses and weights as one process with the doubled batch (the
    cut-out views copy boxes between crops of different nodes, and the contrastive negatives span both)."""
    from swinssl.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", cases=4, size=32, seed=3)
    wrapper = tmp_path / "multinode_swinssl.py"
    wrapper.write_text(WRAPPER)
    shared = tmp_path / "shared_cache"
    data = [*PRETRAIN_TINY, f"data={tmp_path / 'data' / 'dataset.json'}", f"data.cache={shared}"]
    prepared = prepare_on_two_nodes(wrapper, tmp_path, "prepare", ["pretrain/swin_unetr_tiny", *data], "pretrain")
    common = ["pretrain", "--config", "pretrain/swin_unetr_tiny", *data, f"train.out={tmp_path / 'runs'}"]
    port = free_port()
    nodes = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
              str(wrapper), *common, "train.name=nodes", "train.batch_size=1", "train.num_nodes=2",
              "train.strategy=ddp"] for rank in (0, 1)]
    run_all(nodes, tmp_path, "nodes", threads=1)
    single = [sys.executable, str(wrapper), *common, "train.name=single", "train.batch_size=2", "train.num_nodes=1"]
    run_all([single], tmp_path, "single", threads=1)

    assert cache_entries(shared) == prepared
    assert_same_training(tmp_path / "runs" / "nodes", tmp_path / "runs" / "single")
