"""Swin UNETR self-supervised pre-training (Tang et al., CVPR 2022, sec. 3.2).

Views: two independent rotations (k x 90 deg) of each crop, each then cut out (noise
boxes, then boxes copied from another crop of the batch). Tasks and heads on the
encoder's bottleneck: ``inpaint`` (L1 of the reconstruction against the rotated, un-cut
view), ``rotate`` (4-way cross-entropy on token 0), ``contrast`` (NT-Xent between the two
views on token 1, negatives gathered across processes). Weights come from the config.
"""

from __future__ import annotations

import torch
from torch import nn

from swinssl.config import Config, MethodConfig, ModelConfig
from swinssl.errors import ConfigError
from swinssl.nn.heads import ContrastiveHead, ReconstructionHead, RotationHead
from swinssl.nn.swin_transformer import SwinTransformer
from swinssl.ssl.losses import inpainting_l1, ntxent, rotation_ce, weighted_sum
from swinssl.ssl.views import two_views

TASKS = ("inpaint", "rotate", "contrast")


def build_encoder(model: ModelConfig) -> SwinTransformer:
    return SwinTransformer(
        in_chans=model.in_channels, embed_dim=model.feature_size, window_size=(model.window_size,) * 3,
        depths=model.depths, num_heads=model.num_heads, drop_path_rate=model.dropout_path_rate,
        use_checkpoint=model.use_checkpoint, downsample=model.downsample, use_v2=model.use_v2,
        domain_invariance=model.domain_invariance, dim_heads=model.dim_heads, dim_pool=model.dim_pool,
    )


class SSLModel(nn.Module):
    """Swin encoder (``swinViT.*`` keys, as in SwinUNETR) + the three proxy-task heads."""

    def __init__(self, model: ModelConfig, method: MethodConfig):
        super().__init__()
        dim = 16 * model.feature_size  # bottleneck width
        self.swinViT = build_encoder(model)
        self.rotation_head = RotationHead(dim, 4)
        self.contrastive_head = ContrastiveHead(dim, method.embed_dim)
        self.reconstruction_head = ReconstructionHead(dim, model.in_channels)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.swinViT(x, normalize=True)[4])

    def heads(self, bottleneck: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "rotation": self.rotation_head(bottleneck),
            "contrastive": self.contrastive_head(bottleneck),
            "reconstruction": self.reconstruction_head(bottleneck),
        }


def check_tasks(method: MethodConfig, tasks: tuple[str, ...]) -> None:
    unknown = sorted(set(method.weights) - set(tasks))
    if unknown:
        raise ConfigError(f"method.weights: unknown tasks {unknown} for {method.name}; allowed: {', '.join(tasks)}")


def check_config(cfg: Config, tasks: tuple[str, ...] = TASKS) -> None:
    method, preprocess = cfg.method, cfg.preprocess
    check_tasks(method, tasks)
    roi = preprocess.roi_size
    if any(s % 32 for s in roi):
        raise ConfigError(f"preprocess.roi_size {tuple(roi)}: pre-training crops must be multiples of 32")
    if max(roi) < 64 and method.weights.get("contrast", 0):
        raise ConfigError(
            f"preprocess.roi_size {tuple(roi)}: the contrastive task needs a second bottleneck token, "
            "so at least one side of 64 voxels"
        )
    if roi[-1] != roi[-2]:
        raise ConfigError(f"preprocess.roi_size {tuple(roi)}: rotations act on the last two axes, which must be equal")


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (logged, not optimised): the per-dimension std over the batch of the
    L2-normalised embeddings, times sqrt(E). 0 when all embeddings are equal (NT-Xent then sits
    at log(2N - 1)); about 1 when they spread evenly over the sphere."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


def compute_losses(model: nn.Module, x: torch.Tensor, generator: torch.Generator, method: MethodConfig):
    """One step's losses for crops ``x`` (B, C, D, H, W) in [0, 1].

    Returns (weighted total, {task: loss, plus the logged ``embed_spread``}, preview panels
    of the first crop).
    """
    views = two_views(x, generator, max_fraction=method.max_cutout)
    # Both views in one forward pass: every layer normalises per sample, so this equals two passes.
    out = model(torch.cat(views["views"]))
    losses, previews = task_losses(out, views, x, method)
    total = weighted_sum(losses, {k: v for k, v in method.weights.items() if v})
    return total, losses, previews


def rotate_contrast_losses(out: dict, views: dict, n: int, method: MethodConfig) -> dict[str, torch.Tensor]:
    """``rotate`` and ``contrast`` (with the logged ``embed_spread``), where weighted, for the
    outputs of two views of ``n`` crops: shared by every method with these tasks."""
    losses = {}
    if method.weights.get("rotate", 0):
        losses["rotate"] = rotation_ce(out["rotation"], torch.cat(views["rotations"]))
    if method.weights.get("contrast", 0):
        z = out["contrastive"]
        losses["contrast"] = ntxent(z[:n], z[n:], temperature=method.temperature)
        losses["embed_spread"] = embedding_spread(z)
    return losses


def task_losses(out: dict, views: dict, x: torch.Tensor, method: MethodConfig):
    """The proxy-task losses (weighted ones only, plus ``embed_spread``) and preview panels, from
    the model's output for ``cat(views["views"])``."""
    losses = {}
    if method.weights.get("inpaint", 0):
        losses["inpaint"] = inpainting_l1(out["reconstruction"], torch.cat(views["targets"]))
    losses.update(rotate_contrast_losses(out, views, x.shape[0], method))
    previews = {
        "crop": x[0],
        "cut-out view": views["views"][0][0],
        "reconstruction": out["reconstruction"][0].clamp(0, 1),
        "target": views["targets"][0][0],
    }
    return losses, previews
