"""The registered heads, view makers and proxy tasks of the three methods.

View makers (``method.views``):

* ``cutout`` (Swin UNETR SSL, Tang et al. 2022, sec. 3.2): two independent quarter turns of
  each crop, each cut out by noise boxes; gives ``views``, ``targets`` (the rotated, un-cut
  views) and ``rotations``.
* ``masked`` (SwinMM, Wang et al. 2023, sec. 2.1): the crop and one axis-swapped copy, each
  turned by random quarter turns, the same ``mask_patch``^3 cubes masked in both; gives
  ``views``, ``targets``, ``rotations``, ``masks`` (per view), ``mask`` (common frame) and
  ``orders``.

Tasks (``method.weights``): ``inpaint``, ``rotate``, ``contrast`` (Swin UNETR SSL),
``mutual`` (SwinMM), ``density`` (SwinFUSE). Each reads the head it names from the model's
output for the two views concatenated (first views, then second views).
"""

from __future__ import annotations

import torch

from swinssl.config import Config
from swinssl.errors import ConfigError
from swinssl.methods.base import TaskInput, ViewMaker, register_task, register_views
from swinssl.methods.model import HEADS
from swinssl.nn.heads import ContrastiveHead, ReconstructionHead, RotationHead
from swinssl.ssl.losses import inpainting_l1, kde_jsd, masked_mse, mutual_loss, ntxent, rotation_ce, sample_tokens, zscore
from swinssl.ssl.views import multi_views, to_common_frame, two_views

HEADS.update({
    "rotation": lambda dim, channels, method: RotationHead(dim, 4),
    "contrastive": lambda dim, channels, method: ContrastiveHead(dim, method.embed_dim),
    "reconstruction": lambda dim, channels, method: ReconstructionHead(dim, channels),
})


# --- view makers ---------------------------------------------------------------------------------


def _check_cutout(cfg: Config) -> None:
    roi = tuple(cfg.preprocess.roi_size)
    if any(s % 32 for s in roi):
        raise ConfigError(f"preprocess.roi_size {roi}: pre-training crops must be multiples of 32")
    if roi[-1] != roi[-2]:
        raise ConfigError(f"preprocess.roi_size {roi}: rotations act on the last two axes, which must be equal")


def _check_masked(cfg: Config) -> None:
    method, roi = cfg.method, tuple(cfg.preprocess.roi_size)
    if len(set(roi)) != 1 or roi[0] % 32:
        raise ConfigError(f"preprocess.roi_size {roi}: masked views permute the crop's axes, so crops are cubes "
                          "with a side that is a multiple of 32")
    if roi[0] % method.mask_patch:
        raise ConfigError(f"method.mask_patch {method.mask_patch} must divide the crop side {roi[0]}")
    if not 0 < method.mask_ratio < 1:
        raise ConfigError(f"method.mask_ratio must be in (0, 1) (the masked fraction), got {method.mask_ratio}")


register_views(ViewMaker(
    "cutout", lambda x, g, m: two_views(x, g, max_fraction=m.max_cutout),
    frozenset({"views", "targets", "rotations"}), _check_cutout, "cut-out view"))
register_views(ViewMaker(
    "masked", lambda x, g, m: multi_views(x, g, ratio=m.mask_ratio, patch=m.mask_patch),
    frozenset({"views", "targets", "rotations", "masks", "mask", "orders"}), _check_masked, "masked view"))


# --- tasks ---------------------------------------------------------------------------------------


@register_task("inpaint", head="reconstruction", needs=("targets",))
def inpaint(s: TaskInput) -> torch.Tensor:
    """Restore what the views hid. Cut-out views (Swin UNETR): L1 of the reconstruction against
    the rotated, un-cut view over all voxels. Masked views (SwinMM): MSE on the masked voxels
    against the unmasked view (per-sample z-scored with ``method.zscore_target``), mean of the
    two views."""
    recon = s.out["reconstruction"]
    if "masks" not in s.views:
        return inpainting_l1(recon, torch.cat(s.views["targets"]))
    targets = [zscore(t) if s.method.zscore_target else t for t in s.views["targets"]]
    return sum(masked_mse(r, t, m) for r, t, m in zip(recon.split(s.n), targets, s.views["masks"])) / 2


@register_task("rotate", head="rotation", needs=("rotations",))
def rotate(s: TaskInput) -> torch.Tensor:
    """4-way cross-entropy of each view's quarter turn (rotation head on bottleneck token 0)."""
    return rotation_ce(s.out["rotation"], torch.cat(s.views["rotations"]))


def _check_contrast(cfg: Config) -> None:
    roi = tuple(cfg.preprocess.roi_size)
    if max(roi) < 64:
        raise ConfigError(f"preprocess.roi_size {roi}: task 'contrast' reads bottleneck token 1, so it "
                          "needs a second bottleneck token: at least one side of 64 voxels")


@register_task("contrast", head="contrastive", check=_check_contrast)
def contrast(s: TaskInput) -> dict[str, torch.Tensor]:
    """NT-Xent between the two views of each crop (negatives: every other view of the step's whole
    batch, all processes' together), and the logged collapse monitor ``embed_spread``."""
    z = s.out["contrastive"]
    return {"contrast": ntxent(z[: s.n], z[s.n :], temperature=s.method.temperature),
            "embed_spread": embedding_spread(z)}


@torch.no_grad()
def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor (logged, not optimised): the per-dimension std over the batch of the
    L2-normalised embeddings, times sqrt(E). 0 when all embeddings are equal (NT-Xent then sits
    at log(2N - 1)); about 1 when they spread evenly over the sphere."""
    z = torch.nn.functional.normalize(z.float(), dim=1)
    return z.std(dim=0).mean() * z.shape[1] ** 0.5


@register_task("mutual", head="reconstruction", needs=("orders", "rotations", "mask"))
def mutual(s: TaskInput) -> torch.Tensor:
    """SwinMM's mutual learning: the swapped view's reconstruction, mapped back to the common
    frame, agrees on the masked voxels with the un-permuted view's, held as the reference."""
    recon = s.out["reconstruction"].split(s.n)
    common = [to_common_frame(r, o, k) for r, o, k in zip(recon, s.views["orders"], s.views["rotations"])]
    return mutual_loss(common, s.views["mask"])


def _check_density(cfg: Config) -> None:
    if cfg.model.encoder != "domain_invariant_swin":
        raise ConfigError("method.weights.density: task 'density' compares the domain-invariance module's two "
                          "streams; set model.encoder=domain_invariant_swin")
    if cfg.method.density_points < 2:
        raise ConfigError(f"method.density_points must be at least 2, got {cfg.method.density_points}")


@register_task("density", check=_check_density)
def density(s: TaskInput) -> dict[str, torch.Tensor]:
    """SwinFUSE's density matching, *subtracted* (``L = ... - lambda JSD``): the Jensen-Shannon
    divergence between Gaussian KDEs of ``method.density_points`` token features sampled at the
    same positions of the two DIM streams. The loss term is ``-JSD``; ``jsd`` is logged too."""
    points = sample_tokens(list(s.out["streams"]), s.method.density_points, s.generator)
    jsd = kde_jsd(*points)
    return {"density": -jsd, "jsd": jsd}
