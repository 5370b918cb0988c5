"""Networks from a model config (``swinssl.config.ModelConfig``) or a plan's ``network`` dict."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Mapping

from swinssl.nn.multiview import MultiViewSwinUNETR
from swinssl.nn.swin_transformer import SwinTransformer
from swinssl.nn.swin_unetr import SwinUNETR


def _fields(model: Any) -> dict[str, Any]:
    return dict(model) if isinstance(model, Mapping) else dataclasses.asdict(model)


def build_encoder(model: Any) -> SwinTransformer:
    """The Swin encoder of a model config (the ``swinViT`` of SwinUNETR and of pre-training)."""
    f = _fields(model)
    return SwinTransformer(
        in_chans=f["in_channels"], embed_dim=f["feature_size"], window_size=(f["window_size"],) * 3,
        depths=f["depths"], num_heads=f["num_heads"], drop_path_rate=f.get("dropout_path_rate", 0.0),
        use_checkpoint=f.get("use_checkpoint", False), downsample=f.get("downsample", "merging"),
        use_v2=f.get("use_v2", False), domain_invariance=f.get("domain_invariance", False),
        dim_heads=f.get("dim_heads", (3, 6, 12, 24)), dim_pool=f.get("dim_pool", 4),
    )


def build_network(model: Any, out_channels: int | None = None) -> SwinUNETR:
    """SwinUNETR (``MultiViewSwinUNETR`` when ``multiview``) from a model config or a dict with its keys."""
    fields = _fields(model)
    accepted = inspect.signature(SwinUNETR.__init__).parameters
    kwargs = {k: v for k, v in fields.items() if k in accepted}
    if out_channels is not None:
        kwargs["out_channels"] = out_channels
    if fields.get("multiview"):
        # The cross-view block's fields a plan holds (older plans lack some: the network's defaults).
        block = {k: fields[k] for k in ("cross_residual", "cross_attention_at") if k in fields}
        return MultiViewSwinUNETR(**block, **kwargs)
    return SwinUNETR(**kwargs)
