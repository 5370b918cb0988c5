from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

LPS_AFFINE = np.array([[-1.5, 0, 0, 30.0], [0, -1.5, 0, 40.0], [0, 0, 2.0, -20.0], [0, 0, 0, 1]])


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


_rng = np.random.default_rng(0)


def write_volume(path: Path, arr=None, shape=(16, 16, 16), affine=None) -> Path:
    """Write a small NIfTI volume (random floats unless ``arr`` is given, identity affine by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr is None:
        arr = _rng.random(shape, dtype=np.float32)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4) if affine is None else affine), str(path))
    return path


def body_volume(shape=(40, 36, 28), modality="CT", seed=0):
    """A box 'body' in air with a labelled block (1) and a small block (2); returns (image, label)."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, np.uint8)
    body = np.zeros(shape, bool)
    body[4:-4, 4:-4, 3:-3] = True
    label[10:20, 10:18, 8:16] = 1
    label[24:28, 22:26, 18:21] = 2
    if modality == "CT":
        image = np.where(body, 40.0, -1000.0) + np.where(label == 1, 20.0, 0) + np.where(label == 2, 110.0, 0)
    else:
        image = np.where(body, 300.0, 0.0) + np.where(label == 1, 200.0, 0) + np.where(label == 2, -150.0, 0)
    image = image + rng.normal(0, 5, shape) * body
    return image.astype(np.float32), label


@pytest.fixture
def ct_case(tmp_path):
    image, label = body_volume(modality="CT")
    return write_nifti(tmp_path / "ct_image.nii.gz", image), write_nifti(tmp_path / "ct_label.nii.gz", label)


@pytest.fixture
def mri_case(tmp_path):
    image, label = body_volume(modality="MRI", seed=1)
    return write_nifti(tmp_path / "mri_image.nii.gz", image), write_nifti(tmp_path / "mri_label.nii.gz", label)


# A pre-training that takes seconds on CPU: the base of the engine tests' overrides (each test
# file adds its batch size, validation and checkpoint cadence).
TINY_PRETRAIN = [
    "model.feature_size=12", "model.depths=[1,1,1,1]", "preprocess.roi_size=64", "preprocess.num_crops=1",
    "preprocess.spacing=null", "train.num_workers=0", "train.log_every=1", "train.warmup_steps=1",
]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """4 phantom cases of 64^3 (3 CT training volumes, 1 test case), written once per session;
    read-only for the tests. Files that need other phantoms define their own ``phantoms``."""
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=4, size=64, seed=1)
    return out


@pytest.fixture(scope="session")
def small_phantoms(tmp_path_factory):
    """5 phantom cases of 32^3 (seed 2), written once per session: their ``dataset.json``.
    Read-only for the tests (copy the folder to change it)."""
    from swinssl.data.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("small_phantoms")
    write_phantom_dataset(out, cases=5, size=32, seed=2)
    return out / "dataset.json"


def on_processes(target, world: int, *args, timeout: float = 240.0) -> list:
    """Run ``target(rank, port, *args, queue)`` in ``world`` spawned processes (a free localhost ``port`` for
    their process group); each puts one item on ``queue``, starting with its rank. The items, sorted by rank;
    fails fast (not after the timeout) when a process dies, and leaves none running."""
    import queue as queue_module
    import socket
    import time

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, port, *args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    results, deadline = [], time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                results.append(queue.get(timeout=0.5))
            except queue_module.Empty:
                if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    pytest.fail(f"worker processes failed or timed out (exit codes {[p.exitcode for p in procs]})")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return sorted(results, key=lambda item: item[0])
