"""SwinMM masked multi-view pre-training (Wang et al., MICCAI 2023, sec. 2.1).

Views: the crop and one axis-swapped copy of it (``swap_xy`` or ``swap_xz``), each turned
by random quarter turns and masked: half of the 16^3 cubes (``method.mask_ratio`` is the
masked fraction) set to 0, the same cubes in both views. The encoder and heads are those
of Swin UNETR SSL (``swin_unetr.SSLModel``). Tasks:

* ``inpaint``: MSE on the masked voxels against the unmasked view (per-sample z-scored
  with ``method.zscore_target``);
* ``rotate``: 4-way cross-entropy; ``contrast``: NT-Xent between the two views;
* ``mutual``: the swapped view's reconstruction, mapped back to the common frame, agrees on
  the masked voxels with the un-permuted view's, held as the reference (mutual learning).

Where the published code differs, the paper wins (see docs/methods.md).
"""

from __future__ import annotations

import torch
from torch import nn

from swinssl.config import Config, MethodConfig
from swinssl.errors import ConfigError
from swinssl.methods.swin_unetr import SSLModel, check_tasks, rotate_contrast_losses
from swinssl.ssl.losses import masked_mse, mutual_loss, weighted_sum, zscore
from swinssl.ssl.views import multi_views, to_common_frame

TASKS = ("inpaint", "rotate", "contrast", "mutual")

__all__ = ["SSLModel", "TASKS", "check_config", "compute_losses"]


def check_config(cfg: Config) -> None:
    method, preprocess = cfg.method, cfg.preprocess
    check_tasks(method, TASKS)
    roi = tuple(preprocess.roi_size)
    if len(set(roi)) != 1 or roi[0] % 32:
        raise ConfigError(f"preprocess.roi_size {roi}: SwinMM permutes the crop's axes, so crops are cubes "
                          "with a side that is a multiple of 32")
    if roi[0] % method.mask_patch:
        raise ConfigError(f"method.mask_patch {method.mask_patch} must divide the crop side {roi[0]}")
    if roi[0] < 64 and method.weights.get("contrast", 0):
        raise ConfigError(f"preprocess.roi_size {roi}: the contrastive task needs a second bottleneck token, "
                          "so a side of at least 64 voxels")
    if not 0 < method.mask_ratio < 1:
        raise ConfigError(f"method.mask_ratio must be in (0, 1) (the masked fraction), got {method.mask_ratio}")


def compute_losses(model: nn.Module, x: torch.Tensor, generator: torch.Generator, method: MethodConfig):
    """One step's losses for cubic crops ``x`` (B, C, S, S, S) in [0, 1]; as ``swin_unetr.compute_losses``."""
    views = multi_views(x, generator, ratio=method.mask_ratio, patch=method.mask_patch)
    out = model(torch.cat(views["views"]))  # both views in one pass (every layer normalises per sample)
    n = x.shape[0]
    recon = out["reconstruction"].split(n)
    losses = {}
    if method.weights.get("inpaint", 0):
        targets = [zscore(t) if method.zscore_target else t for t in views["targets"]]
        losses["inpaint"] = sum(masked_mse(r, t, m) for r, t, m in zip(recon, targets, views["masks"])) / 2
    losses.update(rotate_contrast_losses(out, views, n, method))
    if method.weights.get("mutual", 0):
        common = [to_common_frame(r, o, k) for r, o, k in zip(recon, views["orders"], views["rotations"])]
        losses["mutual"] = mutual_loss(common, views["mask"])
    total = weighted_sum(losses, {k: v for k, v in method.weights.items() if v})
    shown = recon[0][0] if method.zscore_target else recon[0][0].clamp(0, 1)
    previews = {"crop": x[0], "masked view": views["views"][0][0], "reconstruction": shown,
                "target": views["targets"][0][0]}
    return total, losses, previews
