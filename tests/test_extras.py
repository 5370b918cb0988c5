"""Optional extras install into the README's virtual environment without replacing its torch."""

import subprocess
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_nnunet_extra_installs_beside_the_venvs_torch_and_keeps_it(tmp_path):
    """``make install-nnunet`` in a fresh venv: nnU-Net and its trainer import, torch stays the one
    ``make install`` put there (unpinned, timm's torchvision would pull the newest CUDA torch)."""
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    version = "import torch; print(torch.__version__)"
    make = ["make", "-C", str(root), f"VENV={venv}"]
    done = subprocess.run([*make, "install"], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0 and "Could not find a version" in done.stderr + done.stdout:
        pytest.skip("the package index is not reachable here")
    assert done.returncode == 0, done.stderr[-3000:]
    before = subprocess.run([str(python), "-c", version], capture_output=True, text=True).stdout.strip()
    done = subprocess.run([*make, "install-nnunet"], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    after = subprocess.run([str(python), "-c", version], capture_output=True, text=True).stdout.strip()
    assert after == before and before, (before, after)
    trainer = "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer; import swinssl.nnunet.trainer"
    imported = subprocess.run([str(python), "-c", trainer], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr[-2000:]
