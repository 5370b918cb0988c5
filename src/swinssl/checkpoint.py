"""The checkpoint envelope: the one module that writes and reads checkpoint files.

A swinssl checkpoint is a dict of tensors and plain data, so it loads with ``weights_only=True``
and never runs code::

    {"format": "swinssl", "version": str, "kind": "pretrain" | "finetune", "step": int,
     "model": state dict, "optimizer": ..., "scheduler": ..., "rng": {"torch": ByteTensor, ...},
     "plan": swinssl.plan.Plan.to_dict(), "metrics": {...}, "best_dice": float (fine-tuning),
     "wall_s": float, "world_size": int}

``Checkpoint`` is that envelope; ``save`` writes it atomically, ``Checkpoint.load`` reads one
(refusing a file of another layout), ``read_head`` what it says about itself without its tensors
(memory-mapped, so a large file costs little). ``read_checkpoint`` reads any PyTorch file or ``.safetensors`` as a
plain dict for the loaders of foreign layouts (``nn.load``). ``export_weights`` writes a
checkpoint's weights and plan as ``.safetensors``, which ``read_checkpoint`` reads back as an
envelope without optimiser state.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

import swinssl
from swinssl.errors import CheckpointError, TrainingError
from swinssl.runs import resolve_checkpoint
from swinssl.utils import atomic_path, writable_dir

FORMAT = "swinssl"
KINDS = ("pretrain", "finetune")
TENSOR_FIELDS = ("model", "optimizer", "scheduler", "rng")  # what ``read_head`` leaves out


@dataclass
class Checkpoint:
    """One training state of a run (see the module docstring for the file's keys)."""

    kind: str  # pretrain | finetune
    step: int
    model: dict[str, torch.Tensor]
    plan: dict
    optimizer: dict | None = None
    scheduler: dict | None = None
    rng: dict | None = None
    metrics: dict = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)  # {"dice": ...}: stored as best_dice
    wall_s: float = 0.0  # wall seconds the run has cost so far, resumes included
    world_size: int = 1  # processes of the run
    version: str = swinssl.__version__

    def to_dict(self) -> dict[str, Any]:
        out = {"format": FORMAT, "version": self.version, "kind": self.kind, "step": self.step, "model": self.model,
               "optimizer": self.optimizer, "scheduler": self.scheduler, "rng": self.rng, "plan": self.plan,
               "metrics": self.metrics, "wall_s": self.wall_s, "world_size": self.world_size}
        out.update({f"best_{name}": value for name, value in self.best.items()})
        return out

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Checkpoint:
        """The envelope of a dict read from ``source``; ``CheckpointError`` for another layout."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a swinssl checkpoint (swinssl pretrain / finetune write them)")
        model = data.get("model")
        if not isinstance(model, Mapping) or not all(isinstance(v, torch.Tensor) for v in model.values()):
            raise CheckpointError(f"{source}: the checkpoint's 'model' is not a state dict of tensors")
        try:
            return cls(kind=str(data.get("kind")), step=int(data.get("step", 0)), model=dict(model),
                       plan=dict(data.get("plan") or {}), optimizer=data.get("optimizer"),
                       scheduler=data.get("scheduler"), rng=data.get("rng"), metrics=dict(data.get("metrics") or {}),
                       best={k.removeprefix("best_"): float(v) for k, v in data.items() if k.startswith("best_")},
                       wall_s=float(data.get("wall_s", 0.0)), world_size=int(data.get("world_size", 1)),
                       version=str(data.get("version")))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: malformed swinssl checkpoint ({err})") from None

    @classmethod
    def load(cls, path: str | Path) -> Checkpoint:
        """Read a swinssl checkpoint file (``read_checkpoint``, then ``from_dict``)."""
        return cls.from_dict(read_checkpoint(path), str(path))

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` via a temporary file, fsync and rename: never half a file.

        A failed write (full disk, quota, unwritable folder) raises ``TrainingError`` naming the
        file; the previous checkpoint at ``path`` stays as it was and no temporary is left.
        """
        return save_checkpoint(path, self.to_dict())


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write a dict of tensors and plain data atomically (see ``Checkpoint.save``)."""
    path = Path(path)
    try:
        # Through a Python file: torch.save on a path hides ENOSPC behind a zip-writer RuntimeError.
        with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
            torch.save(dict(state), f)
    except OSError as err:
        kept = "the previous checkpoint there is unchanged" if path.is_file() else "no checkpoint was written"
        raise TrainingError(f"{path}: cannot write the checkpoint ({err.strerror or err}); {kept}") from err
    return path


def read_checkpoint(path: str | Path) -> dict:
    """Any checkpoint file as a dict, read with ``torch.load(weights_only=True)`` (or safetensors) and
    one-line errors; never executes pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain data, "
            f"which could run code{detail}"
        ) from None
    except Exception as err:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: cannot read as a PyTorch checkpoint ({type(err).__name__}: {str(err)[:160]})") from None


@dataclass
class CheckpointHead:
    """What a checkpoint says about itself, without its tensors (``read_head``); None where it does not say."""

    kind: str | None = None
    step: int | None = None
    plan: dict | None = None
    wall_s: float | None = None  # wall seconds the run cost (resumes included)
    world_size: int = 1


def read_head(path: str | Path) -> CheckpointHead:
    """A checkpoint's ``CheckpointHead``, read without executing code; the weights are memory-mapped,
    not read, so a large file costs little. Fields a file (or a foreign layout) lacks are None."""
    raw = _read_plain(path)
    typed = {"kind": str, "step": int, "plan": dict, "wall_s": (int, float), "world_size": int}
    return CheckpointHead(**{k: raw[k] for k, kind in typed.items() if isinstance(raw.get(k), kind)})


def _read_plain(path: str | Path) -> dict[str, Any]:
    """Every key of a checkpoint but its tensors (memory-mapped, not read). {} for a file that is no dict."""
    path = Path(path)
    if path.suffix == ".safetensors":
        data = _read_safetensors(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # an old (non-zip) file cannot be memory-mapped
            data = read_checkpoint(path)
        except (pickle.UnpicklingError, OSError, EOFError):
            data = read_checkpoint(path)  # its one-line error
    return {k: v for k, v in data.items() if k not in TENSOR_FIELDS} if isinstance(data, Mapping) else {}


def export_weights(source: str | Path, out: str | Path) -> Path:
    """Write the model weights of a checkpoint (or run directory) as ``.safetensors``: tensors
    and a JSON plan only, so the file can be shared and loaded without any pickle. ``predict``,
    ``load_pretrained`` and ``finetune.pretrained`` read it like the checkpoint itself."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise CheckpointError("swinssl export needs the safetensors package (pip install safetensors)") from None
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"{out}: the exported file's name must end in .safetensors")
    path = resolve_checkpoint(source)
    ckpt = Checkpoint.load(path)
    meta = {"format": FORMAT, "version": ckpt.version, "kind": ckpt.kind, "step": str(ckpt.step),
            "plan": json.dumps(ckpt.plan), "source": str(path)}
    writable_dir(out.parent)
    with atomic_path(out, suffix=".safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in ckpt.model.items()}, str(tmp), metadata=meta)
    return out


def _read_safetensors(path: Path) -> dict:
    """An exported weights file as a checkpoint dict: tensors only, by construction, and the plan
    from the file's metadata."""
    try:
        from safetensors.torch import load_file, safe_open
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package (pip install safetensors)") from None
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - truncated, not safetensors, ...
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(err).__name__}: {str(err)[:160]})") from None
    ckpt: dict = {"model": tensors}
    if meta.get("format") == FORMAT:
        try:
            ckpt.update(format=FORMAT, version=meta.get("version"), kind=meta.get("kind"),
                        step=int(meta.get("step", 0)), plan=json.loads(meta.get("plan", "{}")))
        except ValueError as err:
            raise CheckpointError(f"{path}: malformed swinssl metadata ({err})") from None
    return ckpt
