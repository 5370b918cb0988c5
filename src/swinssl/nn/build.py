"""Networks from their one description, a model config (``swinssl.config.ModelConfig``), or the
``network`` dict a plan stores of it: the one map from those fields to constructor arguments."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from swinssl.nn.multiview import MultiViewSwinUNETR
from swinssl.nn.swin_transformer import ENCODERS, SwinTransformer
from swinssl.nn.swin_unetr import SwinUNETR

# The ModelConfig fields that are SwinUNETR arguments of the same name (with a plan's ``patch_size``
# and ``out_channels``); ``multiview`` picks the class, which takes MULTIVIEW_FIELDS too. The encoder
# takes its share of them (``encoder_arguments``).
SWIN_UNETR_FIELDS = ("in_channels", "feature_size", "depths", "num_heads", "window_size", "use_v2", "downsample",
                     "dropout_path_rate", "use_checkpoint", "encoder", "invariance_heads", "invariance_pool",
                     "single_voxel_bottleneck", "patch_size", "out_channels")
MULTIVIEW_FIELDS = ("cross_residual", "cross_attention_at")


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


def encoder_arguments(model: Any) -> tuple[str, dict[str, Any]]:
    """(the encoder variant, its constructor arguments) for a model config: the ``swinViT`` that
    ``network_arguments`` would build inside SwinUNETR."""
    a = {"encoder": "swin", "dropout_path_rate": 0.0, "use_checkpoint": False, "downsample": "merging",
         "use_v2": False, "window_size": 7, "patch_size": 2, **network_arguments(model)}
    arguments = dict(in_chans=a["in_channels"], embed_dim=a["feature_size"], window_size=(a["window_size"],) * 3,
                     patch_size=(a["patch_size"],) * 3, depths=a["depths"], num_heads=a["num_heads"],
                     drop_path_rate=a["dropout_path_rate"], use_checkpoint=a["use_checkpoint"],
                     downsample=a["downsample"], use_v2=a["use_v2"])
    if a["encoder"] != "swin":
        arguments.update({k: a[k] for k in ("invariance_heads", "invariance_pool") if k in a})
    return a["encoder"], arguments


def build_encoder(model: Any) -> SwinTransformer:
    """The Swin encoder of a model config (the ``swinViT`` of SwinUNETR and of pre-training)."""
    variant, arguments = encoder_arguments(model)
    if variant not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {variant!r}")
    return ENCODERS[variant](**arguments)


def build_network(model: Any, out_channels: int | None = None) -> SwinUNETR:
    """SwinUNETR (``MultiViewSwinUNETR`` when ``multiview``) from a model config or a dict with its keys."""
    network = MultiViewSwinUNETR if _fields(model).get("multiview") else SwinUNETR
    return network(**network_arguments(model, out_channels))
