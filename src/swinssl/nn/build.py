"""Networks from their one description, a model config (``swinssl.config.ModelConfig``), or the
``network`` dict a plan stores of it: the one map from those fields to constructor arguments."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

from swinssl.nn.multiview import MultiViewSwinUNETR
from swinssl.nn.swin_transformer import SwinTransformer
from swinssl.nn.swin_unetr import SwinUNETR, swin_encoder

# The ModelConfig fields that are SwinUNETR arguments of the same name (with a plan's ``patch_size``
# and ``out_channels``); ``multiview`` picks the class, which takes MULTIVIEW_FIELDS too. The encoder
# takes its share of them, through the map SwinUNETR builds its own with (``swin_unetr.swin_encoder``).
SWIN_UNETR_FIELDS = ("in_channels", "feature_size", "depths", "num_heads", "window_size", "use_v2", "downsample",
                     "dropout_path_rate", "use_checkpoint", "encoder", "invariance_heads", "invariance_pool",
                     "single_voxel_bottleneck", "patch_size", "out_channels")
MULTIVIEW_FIELDS = ("cross_residual", "cross_attention_at")
ENCODER_ARGUMENTS = set(inspect.signature(swin_encoder).parameters)  # the share of them the encoder takes


def _fields(model: Any) -> dict[str, Any]:
    return dict(model) if isinstance(model, Mapping) else dataclasses.asdict(model)


def network_arguments(model: Any, out_channels: int | None = None) -> dict[str, Any]:
    """SwinUNETR's constructor arguments for a model config (or a plan's ``network`` dict; fields an
    older plan lacks keep the constructor's defaults)."""
    fields = _fields(model)
    arguments = {name: fields[name] for name in SWIN_UNETR_FIELDS if name in fields}
    if out_channels is not None:
        arguments["out_channels"] = out_channels
    if fields.get("multiview"):
        arguments.update({name: fields[name] for name in MULTIVIEW_FIELDS if name in fields})
    return arguments


def build_encoder(model: Any) -> SwinTransformer:
    """The Swin encoder of a model config (the ``swinViT`` of SwinUNETR and of pre-training)."""
    arguments = network_arguments(model)
    return swin_encoder(**{k: v for k, v in arguments.items() if k in ENCODER_ARGUMENTS})


def build_network(model: Any, out_channels: int | None = None) -> SwinUNETR:
    """SwinUNETR (``MultiViewSwinUNETR`` when ``multiview``) from a model config or a dict with its keys."""
    network = MultiViewSwinUNETR if _fields(model).get("multiview") else SwinUNETR
    return network(**network_arguments(model, out_channels))
