"""SwinFUSE pre-training (Talasila et al., 2024): Swin UNETR SSL on mixed CT and MRI through a
domain-invariance module (``swinssl.nn.dim``), plus a density-matching term.

Views, heads and the tasks ``inpaint``, ``rotate`` and ``contrast`` are those of Swin UNETR
SSL (``swin_unetr``). The two views of a crop are the DIM's two streams: each view's patch
embedding is gated by its attention over the other's tokens, then each goes through the
encoder. ``density``: the Jensen-Shannon divergence between Gaussian KDEs of
``method.density_points`` token features sampled from each stream's DIM output
(``ssl.losses.kde_jsd``), *subtracted* with weight ``method.weights["density"]`` (lambda,
default 1), as the paper writes ``L = L_inpaint + L_rot + L_contrast - lambda JSD``. The
loss term logged as ``density`` is ``-JSD``; ``jsd`` is logged too. The published code has
no density term and attends across the batch; see docs/methods.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from swinssl.config import Config, MethodConfig, ModelConfig
from swinssl.engine.logging import save_heatmap_overlay
from swinssl.errors import ConfigError
from swinssl.methods import swin_unetr
from swinssl.ssl.losses import kde_jsd, sample_tokens, weighted_sum
from swinssl.ssl.views import two_views

TASKS = ("inpaint", "rotate", "contrast", "density")


class SSLModel(swin_unetr.SSLModel):
    """Swin encoder with its domain-invariance module (``swinViT.dim.*``) + the Swin UNETR SSL heads.

    Input: the two views concatenated, ``(2B, C, ...)``; sample i of the first half and of the
    second half are one pair of streams. Output: the heads' outputs for all 2B views, and the
    two streams' DIM outputs (``streams``, for the density term).
    """

    def __init__(self, model: ModelConfig, method: MethodConfig):
        if not model.domain_invariance:
            raise ConfigError("method swinfuse needs model.domain_invariance=true (its presets set it)")
        super().__init__(model, method)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[0] % 2:
            raise ValueError(f"expected the two views concatenated (an even batch), got {x.shape[0]} samples")
        first, second = self.swinViT.embed(x).chunk(2)
        gate_first, gate_second = self.swinViT.dim.gates(first, second)
        # Each view keeps its own gated stream, so the tasks still have one output per view.
        streams = (first * gate_first, second * gate_second)
        out = self.heads(self.swinViT.stages(torch.cat(streams), normalize=True)[4])
        out["streams"] = streams
        out["gate"] = gate_first[:1].detach().mean(1)  # (1, d, h, w): the preview's DIM panel
        return out


def check_config(cfg: Config) -> None:
    swin_unetr.check_config(cfg, tasks=TASKS)
    if not cfg.model.domain_invariance:
        raise ConfigError("method swinfuse needs model.domain_invariance=true (its presets set it)")
    if cfg.method.density_points < 2:
        raise ConfigError(f"method.density_points must be at least 2, got {cfg.method.density_points}")


def compute_losses(model: nn.Module, x: torch.Tensor, generator: torch.Generator, method: MethodConfig):
    """One step's losses for crops ``x`` (B, C, D, H, W) in [0, 1]; as ``swin_unetr.compute_losses``."""
    views = two_views(x, generator, max_fraction=method.max_cutout)
    out = model(torch.cat(views["views"]))
    losses, previews = swin_unetr.task_losses(out, views, x, method)
    if method.weights.get("density", 0):
        points = sample_tokens(list(out["streams"]), method.density_points, generator)
        losses["jsd"] = kde_jsd(*points)
        losses["density"] = -losses["jsd"]
    total = weighted_sum(losses, {k: v for k, v in method.weights.items() if v})
    gate = F.interpolate(out["gate"][None], size=tuple(x.shape[2:]), mode="nearest")[0, 0]
    previews["DIM gate (view 1)"] = gate / 2  # gates lie in (0, 2)
    return total, losses, previews


@torch.no_grad()
def save_attention_overlay(encoder: nn.Module, view_a: torch.Tensor, view_b: torch.Tensor, path) -> Path:
    """Paper Fig. 1 for two views ``(C, X, Y, Z)`` (the same one twice for a single image): the
    attention each view's locations receive from the other view's queries in the DIM (mean over
    queries and heads), upsampled to the image and drawn over it. Memory grows with tokens x
    pooled tokens: for figures of single crops, not whole volumes."""
    embed_a, embed_b = encoder.embed(view_a[None]), encoder.embed(view_b[None])
    _, _, on_a, on_b = encoder.dim.gates(embed_a, embed_b, weights=True)
    size = tuple(view_a.shape[1:])
    up = [F.interpolate(m[:, None], size=size, mode="trilinear", align_corners=False)[0, 0] for m in (on_a, on_b)]
    return save_heatmap_overlay(Path(path), view_a[0], {"attention on view 1": up[0], "attention on view 2": up[1]},
                                title="SwinFUSE domain-invariance attention")
