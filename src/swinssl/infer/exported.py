"""Exported predictors, read back: an ONNX file or a torch.export program (``.pt2``) written by
``swinssl export`` (``swinssl.infer.export``), as a window network and the plan in its metadata.

The file holds the network of one sliding window -- what ``swinssl.methods.window_predictor``
returns for its network and views choice -- for windows ``(B, C, *roi)``, B free. Its metadata
(ONNX ``metadata_props``; ``.pt2`` extra files), every value text:

=========================  ===================================================================
``swinssl.format``         ``swinssl-predictor``
``swinssl.format_version`` ``1`` (``FORMAT_VERSION``; a newer file is refused)
``swinssl.plan``           the checkpoint's plan as JSON (``Plan.to_dict``): preprocessing,
                           classes, channels, network
``swinssl.views``          the views choice baked into the graph (``single``, ``fused``, ...)
``swinssl.roi``            the window size, a JSON list of 3 ints (the plan's training crop)
``swinssl.version``        the swinssl version that exported it
``swinssl.source``         the checkpoint it was exported from
=========================  ===================================================================

``load_exported`` returns an ``ExportedPredictor``: an ``nn.Module`` mapping a batch of windows
to logits, through onnxruntime (``OnnxPredictor``) or the loaded program (``Pt2Predictor``), on
the CPU. ``predict`` treats it as a checkpoint's network: the plan's preprocessing, the sliding
windows and flips of ``predict_volume``, the inversion and the writing are the same code.

ONNX files hold no code. A ``.pt2`` archive may hold pickled objects, which ``torch.export.load``
would unpickle (run); ``load_exported`` refuses an archive holding any (``_check_no_pickles``):
swinssl's exports store every tensor raw.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from swinssl.errors import CheckpointError, ConfigError, DependencyError
from swinssl.methods import view_choices
from swinssl.plan import Plan

FORMAT = "swinssl-predictor"
FORMAT_VERSION = 1
SUFFIXES = (".onnx", ".pt2")
KEYS = ("swinssl.format", "swinssl.format_version", "swinssl.plan", "swinssl.views", "swinssl.roi",
        "swinssl.version", "swinssl.source")
INPUT_NAME, OUTPUT_NAME = "window", "logits"
ONNX_INSTALL = 'pip install "swinssl[onnx]"'


def is_exported(source: str | Path) -> bool:
    """Whether ``source`` names an exported predictor (by its suffix: ``.onnx`` or ``.pt2``)."""
    return Path(source).suffix.lower() in SUFFIXES


class ExportedPredictor(nn.Module):
    """A window network read from an exported file: ``(B, C, *roi)`` float32 -> logits ``(B, K, *roi)``.

    ``path``: the file; ``plan``: its plan; ``views``: the views choice baked in; ``roi``: the
    window size it takes (no other). The network's method hooks were applied at export: ``predict_volume``
    calls ``window_function``, not ``window_predictor``, for it.
    """

    def __init__(self, path: Path, plan: Plan, views: str, roi: tuple[int, int, int]):
        super().__init__()
        self.path, self.plan, self.views, self.roi = path, plan, views, roi
        self.feature_size = plan.network.feature_size  # window_batch sizes window batches by it

    def window_function(self, views: str, roi_size: Sequence[int] | int) -> nn.Module:
        """Itself, the function sliding windows call, once ``views`` and ``roi_size`` are what it was
        exported for (``ConfigError`` naming the file otherwise)."""
        check_views(self, views)
        roi = tuple(int(s) for s in roi_size) if isinstance(roi_size, Sequence) else (int(roi_size),) * 3
        if roi != self.roi:
            raise ConfigError(f"{self.path}: exported for windows of {_size(self.roi)}, not {_size(roi)}; "
                              "predict with its own window size (no --roi) or export again from the checkpoint")
        return self

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, views={self.views!r}, roi={self.roi}"


class OnnxPredictor(ExportedPredictor):
    """Windows through an onnxruntime session on the CPU, with as many threads as torch uses, one
    window per run."""

    def __init__(self, path: Path, session: Any, plan: Plan, views: str, roi: tuple[int, int, int]):
        super().__init__(path, plan, views, roi)
        self.session = session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = x.detach().to("cpu", torch.float32).contiguous().numpy()
        # One window per run: onnxruntime's kernels already spread one window over the threads, so a batch
        # saves little time, while a run's memory grows with its batch and the arena keeps the largest.
        logits = [torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: windows[i:i + 1]})[0])
                  for i in range(len(windows))]
        return logits[0] if len(logits) == 1 else torch.cat(logits)


class Pt2Predictor(ExportedPredictor):
    """Windows through the loaded ``torch.export`` program (its module, on the CPU)."""

    def __init__(self, path: Path, program: nn.Module, plan: Plan, views: str, roi: tuple[int, int, int]):
        super().__init__(path, plan, views, roi)
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x.to(torch.float32))


def check_views(model: ExportedPredictor, views: str) -> None:
    """``ConfigError`` naming the file unless ``views`` is ``auto`` or the choice baked into it."""
    if views not in ("auto", model.views):
        raise ConfigError(f"{model.path}: exported with views {model.views!r}, not {views!r}; predict with "
                          f"--views {model.views} (or auto), or export again with swinssl export --views {views}")


def exported_views(models: Sequence[nn.Module], views: str, roi_size: Sequence[int]) -> str | None:
    """The views choice of the exported predictors among ``models`` (None when there are none),
    once each was exported for ``views`` (or ``views`` is ``auto``) and windows of ``roi_size``, and
    all hold the same choice: an ensemble predicts through one. ``ConfigError`` naming a file otherwise."""
    exported = [m for m in models if isinstance(m, ExportedPredictor)]
    for model in exported:
        model.window_function(views, roi_size)
    held = {m.views for m in exported}
    if len(held) > 1:
        first = exported[0]
        other = next(m for m in exported if m.views != first.views)
        raise ConfigError(f"{other.path}: exported with views {other.views!r}, {first.path} with {first.views!r}; "
                          "an ensemble predicts through one views choice: export them with the same --views")
    return held.pop() if held else None


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[ExportedPredictor, Plan]:
    """The predictor in an exported file and its plan (``CheckpointError`` naming the file for a
    missing, unreadable or foreign file or metadata; ``DependencyError`` without onnxruntime for
    ``.onnx``; ``ConfigError`` for a device other than the CPU)."""
    path = Path(path).expanduser()
    if torch.device(device).type != "cpu":
        raise ConfigError(f"{path}: exported predictors run on the CPU; use --device cpu (or predict with the "
                          "checkpoint on a GPU)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        return _load_onnx(path)
    if path.suffix.lower() == ".pt2":
        return _load_pt2(path)
    raise CheckpointError(f"{path}: not an exported predictor (.onnx or .pt2)")


def _load_onnx(path: Path) -> tuple[OnnxPredictor, Plan]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise DependencyError(f"{path}: predicting with an ONNX file needs onnxruntime: {ONNX_INSTALL}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Memory patterns allocate a run's whole plan as one block, kept beside the arena: without them the
    # peak is lower, for a little more time.
    options.enable_mem_pattern = False
    options.log_severity_level = 3  # errors only
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - truncated, not ONNX, an opset this onnxruntime lacks...
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(err)})") from None
    plan, views, roi = read_metadata(session.get_modelmeta().custom_metadata_map, path)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise CheckpointError(f"{path}: expected one input {INPUT_NAME!r} and one output {OUTPUT_NAME!r}, "
                              f"found {names[0]} and {names[1]}")
    return OnnxPredictor(path, session, plan, views, roi), plan


def _load_pt2(path: Path) -> tuple[Pt2Predictor, Plan]:
    _check_no_pickles(path)
    extra = {key: "" for key in KEYS}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as err:  # noqa: BLE001 - truncated, not a torch.export archive, another torch's format...
        raise CheckpointError(f"{path}: torch.export cannot load it ({_first_line(err)})") from None
    plan, views, roi = read_metadata({k: v for k, v in extra.items() if v}, path)
    return Pt2Predictor(path, program.module(), plan, views, roi), plan


def read_metadata(meta: Mapping[str, str], path: Path) -> tuple[Plan, str, tuple[int, int, int]]:
    """(plan, views, roi) from an exported file's metadata, validated (``CheckpointError`` naming ``path``)."""
    if meta.get("swinssl.format") != FORMAT or "swinssl.plan" not in meta:
        raise CheckpointError(f"{path}: no swinssl plan in its metadata; export the fine-tuned checkpoint with "
                              "swinssl export CHECKPOINT --out FILE.onnx (or .pt2)")
    try:
        version = int(meta.get("swinssl.format_version", ""))
        raw = json.loads(meta["swinssl.plan"])
        roi = tuple(int(s) for s in json.loads(meta.get("swinssl.roi", "null")))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: corrupt swinssl metadata ({_first_line(err)})") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written in predictor format {version} by swinssl "
                              f"{meta.get('swinssl.version')}; this swinssl reads format {FORMAT_VERSION}: upgrade it")
    if len(roi) != 3 or min(roi) < 1:
        raise CheckpointError(f"{path}: corrupt swinssl metadata (window size {list(roi)})")
    plan = Plan.from_dict(raw, source=str(path))
    if plan.out_channels is None:
        raise CheckpointError(f"{path}: its plan holds no classes (network.out_channels)")
    views = meta.get("swinssl.views", "")
    if views not in view_choices() or views == "auto":
        raise CheckpointError(f"{path}: corrupt swinssl metadata (views {views!r})")
    return plan, views, roi  # type: ignore[return-value]


def _check_no_pickles(path: Path) -> None:
    """Refuse a ``.pt2`` archive from which ``torch.export.load`` would unpickle anything: pickled
    weights or constants, custom objects, legacy ``.pt`` payloads, or sample inputs that do not load
    with ``weights_only=True`` (torch falls back to a full unpickle for those)."""
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}; swinssl reads only .pt2 files whose tensors are stored raw "
                               "(as swinssl export writes them), since unpickling can run code")

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
            if not configs:
                raise refuse("not a torch.export archive of the current format (no weights configuration)")
            for name in names:
                if "/data/weights/" in name and name.endswith(".pt") or "/data/constants/" in name and name.endswith(".pt"):
                    raise refuse(f"it holds the pickled payload {name}")
            for name in configs:
                for fqn, entry in json.loads(archive.read(name)).get("config", {}).items():
                    stored = str(entry.get("path_name", ""))
                    if entry.get("use_pickle") or ("constants" in name and not stored.startswith("tensor")):
                        raise refuse(f"it holds {fqn} as a pickled object")
            for name in names:
                if "/data/sample_inputs/" in name:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - not a zip, truncated, a sample input that needs a full unpickle
        raise CheckpointError(f"{path}: not a readable torch.export archive ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _size(roi: Sequence[int]) -> str:
    return "x".join(str(s) for s in roi)
