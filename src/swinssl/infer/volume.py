"""One preprocessed volume: sliding windows, test-time flips and the methods' views."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from torch import nn

from swinssl.infer.exported import ExportedPredictor
from swinssl.methods import Method, window_predictor


@dataclass(frozen=True)
class View:
    """One flip of the whole volume for test-time augmentation.

    ``forward`` maps a batch ``(B, C, X, Y, Z)`` into the view, ``inverse`` maps the network's
    output for it back. (Multi-view fusion permutes each window instead: ``window_predictor``.)
    """

    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def flip_view(axes: tuple[int, ...]) -> View:
    """Flip the given spatial axes (0, 1, 2 of X, Y, Z); a flip is its own inverse."""
    dims = tuple(2 + a for a in axes)
    if not dims:
        return View("identity", _identity, _identity)

    def flip(x: torch.Tensor) -> torch.Tensor:
        return torch.flip(x, dims)

    return View("flip" + "".join("xyz"[a] for a in axes), flip, flip)


def flip_views() -> list[View]:
    """The 8 combinations of flipping X, Y and Z (the identity first)."""
    return [flip_view(axes) for n in range(4) for axes in itertools.combinations(range(3), n)]


def predict_volume(
    model: nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int] | int,
    overlap: float = 0.5,
    sw_batch_size: int | None = None,
    mode: str = "gaussian",
    flips: bool = False,
    views: str = "auto",
    on_windows: Callable[[int], None] | None = None,
    method: Method | None = None,
) -> torch.Tensor:
    """Softmax probabilities ``(C, X, Y, Z)`` (float32, CPU) for one preprocessed image ``(C_in, X, Y, Z)``.

    Sliding windows of ``roi_size`` with ``overlap``, blended with ``mode`` (``gaussian``
    weights window centres, ``constant`` averages); an image smaller than the ROI is padded.
    ``sw_batch_size``: windows per forward pass (None: ``window_batch``).
    Windows run on the model's device and are stitched on the image's device (CPU for the
    pipeline's output), so a large volume does not have to fit in GPU memory at once.
    ``flips``: average the softmax over the 8 flips of the spatial axes (flip, predict, flip back).
    ``views``: what each window is predicted through, a choice of the methods' inference hooks
    (``swinssl.methods.window_predictor``) of ``method``, whose hooks the model was fine-tuned with
    (``methods.method_of`` its plan; None: a plain network's): ``auto`` (the method decides: fused
    for SwinMM multi-view networks, else single), ``single``, ``fused`` (the softmax of the three
    axis orders averaged) or one axis order (``identity``, ``swap_xy``, ``swap_xz``). An exported
    predictor (``swinssl.infer.exported``) is that function already: ``views`` must be its own (or
    ``auto``) and ``roi_size`` its window size. ``on_windows(n)`` is called after each forward
    pass of ``n`` windows (a progress bar's update).
    """
    if image.ndim != 4:
        raise ValueError(f"expected one image (C, X, Y, Z), got shape {tuple(image.shape)}")
    chosen = flip_views() if flips else [flip_view(())]
    x = (image.as_tensor() if isinstance(image, MetaTensor) else image).float().unsqueeze(0)
    device = _device_of(model)
    roi = (roi_size,) * 3 if isinstance(roi_size, int) else tuple(roi_size)
    sw_batch_size = sw_batch_size or window_batch(model, roi, method)
    if isinstance(model, ExportedPredictor):
        predictor = model.window_function(views, roi)
    else:
        predictor, _ = window_predictor(model, method, views)
    if on_windows is not None:
        predictor = _counted(predictor, on_windows)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for view in chosen:
            logits = sliding_window_inference(
                view.forward(x), roi, sw_batch_size, predictor, overlap=overlap, mode=mode, sw_device=device, device=x.device
            )
            # Averaged as probabilities, not logits: one confident view must not outvote the others.
            probs = view.inverse(torch.softmax(logits.float(), dim=1))
            total = probs if total is None else total.add_(probs)
    assert total is not None
    return (total / len(chosen))[0].cpu()


def _counted(predictor: Callable, on_windows: Callable[[int], None]) -> Callable:
    def counted(windows: torch.Tensor) -> torch.Tensor:
        out = predictor(windows)
        on_windows(windows.shape[0])
        return out

    return counted


# Bytes one window holds at its inference peak, per voxel and feature channel (measured on CPU:
# 27-42 at feature 12-48, ROI 64-96, batch 1-4), times the method's streams per window.
WINDOW_BYTES_PER_VOXEL_FEATURE = 40
MAX_WINDOW_BATCH = 16


def window_batch(model: nn.Module, roi_size: Sequence[int], method: Method | None = None,
                 memory_share: float = 0.25) -> int:
    """Windows per forward pass when none is given: one per CPU thread (a batch of small windows
    keeps the cores busy where one window's many small operations do not), as many as fit
    ``memory_share`` of the free GPU memory on a GPU; on either, no more than fit that share of
    the free memory, at least 1 and at most ``MAX_WINDOW_BATCH``. ``method``: whose inference
    hooks run the model (its streams per window); None: a plain network's."""
    streams = method.window_streams() if method is not None else 1
    return network_window_batch(getattr(model, "feature_size", 48), roi_size, _device_of(model), streams, memory_share)


def network_window_batch(feature_size: int, roi_size: Sequence[int], device: torch.device | str, streams: int = 1,
                         memory_share: float = 0.25) -> int:
    """``window_batch`` of a network of ``feature_size`` whose windows hold ``streams`` inputs' worth
    of activations, on ``device``."""
    per_window = WINDOW_BYTES_PER_VOXEL_FEATURE * math.prod(roi_size) * feature_size * streams
    device = torch.device(device)
    if device.type == "cuda":
        wanted, free = MAX_WINDOW_BATCH, torch.cuda.mem_get_info(device)[0]
    else:
        wanted, free = torch.get_num_threads(), _available_memory()
    return max(1, min(wanted, MAX_WINDOW_BATCH, int(memory_share * free // per_window)))


def _available_memory() -> int:
    """Bytes the kernel could hand out now (Linux ``MemAvailable``); elsewhere, as if plenty."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2**40


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")
