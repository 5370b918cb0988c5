"""Exporting a fine-tuned model as a predictor: the network of one sliding window as an ONNX file
(for onnxruntime) or a ``torch.export`` program (``.pt2``), with its plan in the file's metadata
(the layout and the reading side: ``swinssl.infer.exported``).

What is exported is ``WindowNetwork``: the function that ``predict_volume``'s sliding windows call,
``swinssl.methods.window_predictor(network, method_of(plan), views)``, as a module -- a plain
SwinUNETR; a SwinMM multi-view network fused over its three view pairs (``fused``, its default)
or one axis order; a SwinFUSE network whose domain-invariance module gets the window in both
streams -- traced for windows of the plan's ROI, the batch a dynamic axis (spatial axes fixed).

Two export-only choices, neither changing what is computed:

* tracing runs under ``torch.no_grad`` (the inference path of the network: shift masks built
  per forward; on CPU the chunked attention of ``nn.cpu_attention`` is a Python loop the
  exporters do not trace, and the network takes ``F.scaled_dot_product_attention`` while
  compiling or exporting);
* ONNX only: instance normalisation is computed by ``InstanceNormByAxes`` (the same formula,
  means taken one spatial axis at a time; zero at a one-voxel bottleneck, as the network's own
  ``OneVoxelInstanceNorm3d``). onnxruntime's ``InstanceNormalization`` and ``ReduceMean`` sum
  a whole channel of a window in one float32 accumulator: on windows half zero padding, half
  tissue, the normalised values were 7e-5 off and the logits 5e-5; by axes, 2e-6
  (tests/test_export.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

import swinssl
from swinssl.checkpoint import export_weights
from swinssl.errors import ConfigError, DependencyError
from swinssl.infer.exported import FORMAT, FORMAT_VERSION, INPUT_NAME, ONNX_INSTALL, OUTPUT_NAME, SUFFIXES
from swinssl.infer.model import load_model
from swinssl.methods import Method, check_views, method_of, window_predictor
from swinssl.plan import Plan
from swinssl.runs import resolve_checkpoint
from swinssl.utils import atomic_path, writable_dir

# Opset 23 brought the Attention operator that the windows' attention maps onto. 24, not the newest
# (25): onnxruntime 1.32 runs opset 24's Attention with its own kernel but expands opset 25's
# into the operator's function body, which made whole predictions slower than PyTorch's
# (benchmarks/predict_onnx.py).
ONNX_OPSET = 24
# Fold constant subgraphs whose inputs have up to this many elements (a 96^3 window's shift-mask regions:
# 49^3); their outputs stay under the exporter's default limit, so the masks themselves (160 MB at 96^3)
# are computed at run time, not stored.
FOLD_INPUT_LIMIT = 2**20
EXAMPLE_BATCH = 2  # traced with 2 windows: a batch of 1 would be specialised to 1 by torch.export


class WindowNetwork(nn.Module):
    """The function sliding windows call for ``network`` (fine-tuned with ``method``'s hooks) and ``views``, as a module:
    ``(B, C, *roi)`` -> logits (or log-probabilities, for fused views) ``(B, K, *roi)``.
    ``views`` is the resolved choice (``auto`` replaced by the method's default)."""

    def __init__(self, network: nn.Module, method: Method | None = None, views: str = "auto"):
        super().__init__()
        self.network = network
        function, self.views = window_predictor(network, method, views)
        self._function = (function,)  # a tuple: not registered twice when it is the network itself

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._function[0](x)


class InstanceNormByAxes(nn.Module):
    """Instance normalisation ``(x - mean) / sqrt(var + eps)`` over the spatial axes of ``(B, C, ...)``,
    each statistic a mean taken one spatial axis at a time (see the module docstring), with the
    affine weight and bias of the module it replaces, if any."""

    def __init__(self, norm: nn.modules.instancenorm._InstanceNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def _mean(self, x: torch.Tensor) -> torch.Tensor:
        for axis in range(x.ndim - 1, 1, -1):
            x = x.mean(axis, keepdim=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        out = centred * torch.rsqrt(self._mean(centred * centred) + self.eps)
        if self.weight is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def with_instance_norm_by_axes(network: nn.Module) -> nn.Module:
    """A copy of ``network`` whose instance normalisations (without running statistics) are
    ``InstanceNormByAxes``; ``network`` itself is left as it was."""
    network = copy.deepcopy(network)
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
                setattr(module, name, InstanceNormByAxes(child))
    return network


def metadata(plan: Plan, views: str, roi: tuple[int, ...], source: str | Path) -> dict[str, str]:
    """The metadata of an exported predictor (``swinssl.infer.exported``), every value text."""
    return {
        "swinssl.format": FORMAT,
        "swinssl.format_version": str(FORMAT_VERSION),
        "swinssl.plan": json.dumps(plan.to_dict()),
        "swinssl.views": views,
        "swinssl.roi": json.dumps([int(s) for s in roi]),
        "swinssl.version": swinssl.__version__,
        "swinssl.source": str(source),
    }


def export(source: str | Path, out: str | Path, views: str = "auto") -> Path:
    """``swinssl export``: the format by the name's ending: ``.safetensors`` (weights and plan,
    ``swinssl.checkpoint.export_weights``; no views choice), ``.onnx`` or ``.pt2`` (``export_predictor``)."""
    suffix = Path(out).suffix.lower()
    if suffix == ".safetensors":
        if views != "auto":
            raise ConfigError("--views applies to .onnx and .pt2 predictors, not to .safetensors weights")
        return export_weights(source, out)
    if suffix in SUFFIXES:
        return export_predictor(source, out, views)
    raise ConfigError(f"{out}: the name's ending picks the format: .safetensors (weights and plan), "
                      ".onnx (onnxruntime predictor) or .pt2 (torch.export predictor)")


def export_predictor(source: str | Path, out: str | Path, views: str = "auto") -> Path:
    """Write the window network of a fine-tuned checkpoint (or run directory) ``source`` to ``out``:
    ONNX for a name ending in ``.onnx``, ``torch.export`` for ``.pt2``; returns ``out``.

    ``views``: a choice of ``swinssl.methods.view_choices()`` baked into the graph (``auto``: the
    network's method's default: ``fused`` for SwinMM multi-view networks, else ``single``).
    Written atomically. Raises ``ConfigError`` for another suffix or views choice,
    ``DependencyError`` without the ONNX exporter's packages, ``CheckpointError`` for a
    checkpoint predict would refuse (e.g. a pre-training one).
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"{out}: an exported predictor's name ends in {' or '.join(SUFFIXES)}")
    check_views(views)
    if suffix == ".onnx":
        _check_onnx_exporter(out)
    path = resolve_checkpoint(source)
    network, plan = load_model(path)
    roi = tuple(int(s) for s in plan.preprocess.roi_size)
    example = torch.zeros((EXAMPLE_BATCH, plan.network.in_channels, *roi))
    writable_dir(out.parent)
    if suffix == ".onnx":
        window = WindowNetwork(with_instance_norm_by_axes(network), method_of(plan), views).eval()
        meta = metadata(plan, window.views, roi, path)
        with atomic_path(out, suffix=suffix) as tmp:
            _write_onnx(window, example, tmp, meta)
    else:
        window = WindowNetwork(network, method_of(plan), views).eval()
        meta = metadata(plan, window.views, roi, path)
        with atomic_path(out, suffix=suffix) as tmp:
            _write_pt2(window, example, tmp, meta)
    return out


def _batch_axis() -> tuple[dict[int, torch.export.Dim], ...]:
    return ({0: torch.export.Dim("batch", min=1)},)


def _write_pt2(window: WindowNetwork, example: torch.Tensor, tmp: Path, meta: dict[str, str]) -> None:
    with torch.no_grad(), _quiet_exporter():
        program = torch.export.export(window, (example,), dynamic_shapes=_batch_axis())
    torch.export.save(program, str(tmp), extra_files=meta)


def _write_onnx(window: WindowNetwork, example: torch.Tensor, tmp: Path, meta: dict[str, str]) -> None:
    import onnxscript.optimizer

    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(window, (example,), None, dynamo=True, opset_version=ONNX_OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=_batch_axis(), verbose=False, optimize=False)
        # The shift masks are built from constants in every forward: fold those subgraphs first (a third
        # of the nodes are left). The exporter's own optimisation, run next, pattern-matches every node
        # in time growing faster than the graph: on a SwinMM graph (six encoder-decoder passes) it took
        # minutes more without the folding first.
        onnxscript.optimizer.fold_constants(program.model, input_size_limit=FOLD_INPUT_LIMIT)
        onnxscript.optimizer.remove_unused_nodes(program.model)
        program.optimize()
    program.model.metadata_props.update(meta)
    program.save(str(tmp), external_data=False)  # one file: weights inside (under ONNX's 2 GB)


def _check_onnx_exporter(out: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise DependencyError(f"{out}: exporting to ONNX needs the {err.name} package: {ONNX_INSTALL}") from None


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporters' progress lines, warnings and log messages kept off the user's terminal (their
    errors still raise)."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                                     "onnx_ir", "torch.fx.experimental.symbolic_shapes")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
