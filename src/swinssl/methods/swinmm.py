"""SwinMM (Wang et al., MICCAI 2023): masked multi-view pre-training, multi-view fine-tuning
with cross-view attention and consistency, semi-supervised pseudo-labels, fused inference.

Pre-training (sec. 2.1), views ``masked``: the crop and one axis-swapped copy of it
(``swap_xy`` or ``swap_xz``), each turned by random quarter turns and masked: half of the
16^3 cubes (``method.mask_ratio`` is the masked fraction) set to 0, the same cubes in both
views. Tasks: ``inpaint`` (MSE on the masked voxels, target optionally z-scored), ``rotate``,
``contrast`` and ``mutual`` (the swapped view's reconstruction, mapped back to the common
frame, agrees on the masked voxels with the un-permuted view's, held as the reference).

Fine-tuning (sec. 2.2), for networks with ``model.multiview`` (``nn.multiview``): each crop
is seen in two axis orders drawn per step, joined by the network's cross-view block
(``model.cross_attention_at``); the loss is the mean DiceCE of the two views plus
``finetune.consistency_weight`` x their consistency term (``finetune.consistency``: symmetric
KL, or 1 - cosine; Table 7). With ``finetune.unlabeled``, random crops of unlabelled volumes
add the same loss against the detached argmax of the two views' mean softmax (pseudo-labels).

Inference: ``fused`` (the softmax of the three axis orders averaged; the default for
multi-view networks), ``single`` or one axis order (``identity``, ``swap_xy``, ``swap_xz``).
For a plain SwinUNETR, ``fused`` is an ensemble of permuted inputs (the tables' "Fuse" row).

Where the published code differs, the paper wins (see docs/methods.md).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from swinssl.config import Config
from swinssl.methods.base import Method
from swinssl.nn.axes import PERMUTATIONS, permute, unpermute
from swinssl.nn.multiview import VIEW_ORDERS, MultiViewSwinUNETR, fused_log_probs
from swinssl.ssl.losses import cosine_consistency, symmetric_kl

CONSISTENCY = {"kl": symmetric_kl, "cosine": cosine_consistency}  # finetune.consistency -> the term


def draw_view_pair(seed: int) -> tuple:
    """Two distinct axis orders of the three (identity, swap_xy, swap_xz), as SwinMM draws per batch."""
    first, second = np.random.default_rng(seed).permutation(len(VIEW_ORDERS))[:2]
    return VIEW_ORDERS[first], VIEW_ORDERS[second]


def multiview_loss(model, x: torch.Tensor, y: torch.Tensor | None, orders, loss_fn,
                   consistency: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DiceCE of the two views, their ``consistency`` term) for crops ``x``.

    ``y=None`` (unlabelled crops): the target is the detached argmax of the two views' mean softmax.
    """
    outs = model(x, orders=orders)
    if y is None:
        with torch.no_grad():
            y = sum(torch.softmax(o.float(), 1) for o in outs).argmax(1, keepdim=True)
    return sum(loss_fn(o, y) for o in outs) / len(outs), consistency(*outs)


class SwinMM(Method):
    views = ("single", "fused", *PERMUTATIONS)

    network = {"multiview": True}

    def check_finetune(self, cfg: Config) -> None:
        pass  # unlabelled volumes are welcome: the views' mean gives their pseudo-labels

    def finetune_losses(self, model, x, y, unlabeled, seed, cfg, segmentation_loss):
        ft = cfg.finetune
        orders, term = draw_view_pair(seed), CONSISTENCY[ft.consistency]
        seg, consistency = multiview_loss(model, x, y, orders, segmentation_loss, term)
        total = seg + ft.consistency_weight * consistency
        parts = {"dice_ce": seg, "consistency": consistency}
        if unlabeled is not None:
            parts["unlabeled_dice_ce"], parts["unlabeled_consistency"] = multiview_loss(
                model, unlabeled, None, orders, segmentation_loss, term)
            total = total + ft.unlabeled_weight * (parts["unlabeled_dice_ce"]
                                                   + ft.consistency_weight * parts["unlabeled_consistency"])
        return total, parts

    def default_views(self) -> str:
        return "fused"

    def window_streams(self) -> int:
        return 3  # the three axis orders of a fused window

    def window_predictor(self, model: nn.Module, views: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """``fused``: the three axis orders' softmax averaged -- through the cross-view pairs for a
        ``MultiViewSwinUNETR``, as an ensemble of permuted inputs for a plain SwinUNETR. Otherwise
        the single axis order ``views`` (``single`` = ``identity``); a multi-view model pairs it
        with the next order."""
        if isinstance(model, MultiViewSwinUNETR):
            if views == "fused":
                return model
            order = PERMUTATIONS[views if views in PERMUTATIONS else "identity"]
            pair = (order, VIEW_ORDERS[(VIEW_ORDERS.index(order) + 1) % 3])
            return lambda w: model(w, orders=pair)[0]
        if views == "fused":
            return lambda w: fused_log_probs([unpermute(model(permute(w, o)), o) for o in VIEW_ORDERS])
        if views in ("single", "identity"):
            return model
        order = PERMUTATIONS[views]
        return lambda w: unpermute(model(permute(w, order)), order)


METHOD = SwinMM("swinmm", view_maker="masked")
