"""SwinFUSE pre-training (Talasila et al., 2024): Swin UNETR SSL on mixed CT and MRI through a
domain-invariance module (``swinssl.nn.dim``), plus a density-matching term.

Views (``cutout``) and the tasks ``inpaint``, ``rotate`` and ``contrast`` are those of Swin
UNETR SSL. The two views of a crop are the DIM's two streams (``methods.model.SSLModel``):
each view's patch embedding is gated by its attention over the other's tokens, then each goes
through the encoder. ``density``: the Jensen-Shannon divergence between Gaussian KDEs of
``method.density_points`` token features sampled from each stream's DIM output, *subtracted*
with weight ``method.weights["density"]`` (lambda, default 1), as the paper writes
``L = L_inpaint + L_rot + L_contrast - lambda JSD``. The published code has no density term
and attends across the batch; see docs/methods.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swinssl.config import Config
from swinssl.errors import ConfigError
from swinssl.methods.base import Method
from swinssl.plots import save_heatmap_overlay
from swinssl.ssl.views import cutout


class SwinFUSE(Method):
    """Fine-tuning keeps the module (sec. 2.4) and feeds it two views of each crop: the crop
    (which the conv path, the label and inference see) and a copy with up to
    ``finetune.dim_cutout`` of it cut out (noise boxes, as pre-training's views)."""

    network = {"encoder": "domain_invariant_swin", "multiview": False}

    def check_finetune(self, cfg: Config) -> None:
        super().check_finetune(cfg)
        if not 0.0 <= cfg.finetune.dim_cutout < 1.0:
            raise ConfigError(f"finetune.dim_cutout must be in [0, 1), got {cfg.finetune.dim_cutout}")

    def finetune_losses(self, model, x, y, unlabeled, seed, cfg, segmentation_loss):
        if cfg.finetune.dim_cutout == 0:
            return segmentation_loss(model(x), y), {}
        second = cutout(x, torch.Generator().manual_seed(seed), cfg.finetune.dim_cutout)
        return segmentation_loss(model(x, second=second), y), {}

    def window_streams(self) -> int:
        return 2  # the input goes through the module as both of its streams


METHOD = SwinFUSE("swinfuse", view_maker="cutout", encoder="domain_invariant_swin")


@torch.no_grad()
def save_attention_overlay(encoder: nn.Module, view_a: torch.Tensor, view_b: torch.Tensor, path) -> Path:
    """Paper Fig. 1 for two views ``(C, X, Y, Z)`` (the same one twice for a single image): the
    attention each view's locations receive from the other view's queries in the DIM (mean over
    queries and heads), upsampled to the image and drawn over it. Memory grows with tokens x
    pooled tokens: for figures of single crops, not whole volumes."""
    embed_a, embed_b = encoder.embed(view_a[None]), encoder.embed(view_b[None])
    _, _, on_a, on_b = encoder.invariance.gates(embed_a, embed_b, weights=True)
    size = tuple(view_a.shape[1:])
    up = [F.interpolate(m[:, None], size=size, mode="trilinear", align_corners=False)[0, 0] for m in (on_a, on_b)]
    return save_heatmap_overlay(Path(path), view_a[0], {"attention on view 1": up[0], "attention on view 2": up[1]},
                                title="SwinFUSE domain-invariance attention")
