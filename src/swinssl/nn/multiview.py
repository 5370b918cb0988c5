"""SwinMM's multi-view SwinUNETR (Wang et al., MICCAI 2023, sec. 2.2): two views of a crop
(axis permutations) through one SwinUNETR, meeting at the bottleneck in a cross-view
attention block, each decoded and mapped back to the common frame.

Where the views meet is ``cross_attention_at`` (Table 7): ``bottleneck`` (the default, as
SwinMM), ``intermediate`` (one level shallower: the skip that ``decoder5`` joins, the stage-4
Swin output with 8 x feature_size channels at 1/16 of the input) or ``none``.

State dict: SwinUNETR's keys plus ``cross_attention.*`` (none for ``none``), so a SwinUNETR
checkpoint (or SwinMM pre-trained encoder) loads into it with only the block missing.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from swinssl.nn.axes import PERMUTATIONS, permute, unpermute
from swinssl.nn.swin_unetr import SwinUNETR

Order = tuple[int, int, int]
VIEW_ORDERS: list[Order] = list(PERMUTATIONS.values())  # identity, swap_xy, swap_xz


class CrossViewAttention(nn.Module):
    """Each view's tokens (at the bottleneck, or where ``cross_attention_at`` puts the block) attend
    to the other view's (shared Q/K/V and output projections, one pre-LayerNorm shared by both
    views, multi-head).

    ``(B, C, d, h, w)`` x2 (any token layout of the same count) -> the same shapes. The
    SwinMM code replaces each view's features by the attention output (``residual=False``,
    the default); ``residual=True`` adds it to them instead.
    """

    def __init__(self, dim: int, num_heads: int, residual: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"cross-view attention: {dim} channels do not split into {num_heads} heads")
        self.residual = residual
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if a.shape[:2] != b.shape[:2] or a[0, 0].numel() != b[0, 0].numel():
            raise ValueError(f"views differ in batch, channels or token count: {tuple(a.shape)} and {tuple(b.shape)}")
        ta, tb = a.flatten(2).transpose(1, 2), b.flatten(2).transpose(1, 2)  # (B, tokens, C)
        na, nb = self.norm(ta), self.norm(tb)
        oa = self.attn(na, nb, nb, need_weights=False)[0]  # view a queries view b
        ob = self.attn(nb, na, na, need_weights=False)[0]  # and the reverse, same projections
        if self.residual:
            oa, ob = ta + oa, tb + ob
        return oa.transpose(1, 2).reshape(a.shape), ob.transpose(1, 2).reshape(b.shape)


# Where the two views meet (``cross_attention_at``) -> the channels there, in feature sizes.
CROSS_ATTENTION_WIDTH = {"bottleneck": 16, "intermediate": 8, "none": 0}


class MultiViewSwinUNETR(SwinUNETR):
    """SwinUNETR with a ``CrossViewAttention`` block where the two views meet (``cross_attention_at``).

    ``model(x, orders=(o1, o2))``: logits of the two views of ``x``, both in ``x``'s frame
    (training). ``model(x)``: the fused prediction, ``log`` of the mean softmax over the view
    pairs (identity, swap_xy), (swap_xy, swap_xz), (swap_xz, identity) -- each view twice, as
    SwinMM's test-time fusion -- usable as logits (its softmax is the fused probability).
    Heads: one per 32 channels (24 at the bottleneck of feature size 48, as SwinMM).
    """

    def __init__(self, *args, cross_residual: bool = False, cross_attention_at: str = "bottleneck", **kwargs):
        super().__init__(*args, **kwargs)
        if cross_attention_at not in CROSS_ATTENTION_WIDTH:
            raise ValueError(f"cross_attention_at must be one of {', '.join(CROSS_ATTENTION_WIDTH)}, "
                             f"got {cross_attention_at!r}")
        self.cross_attention_at = cross_attention_at
        dim = CROSS_ATTENTION_WIDTH[cross_attention_at] * self.feature_size
        self.cross_attention = CrossViewAttention(dim, max(1, dim // 32), residual=cross_residual) if dim else None

    def forward(self, x: torch.Tensor, orders: Sequence[Order] | None = None):
        if orders is not None:
            return self.view_logits(x, orders)
        pairs = [(VIEW_ORDERS[i], VIEW_ORDERS[(i + 1) % 3]) for i in range(3)]
        return fused_log_probs([logits for pair in pairs for logits in self.view_logits(x, pair)])

    def view_logits(self, x: torch.Tensor, orders: Sequence[Order]) -> list[torch.Tensor]:
        """Logits ``(B, K, *x.shape[2:])`` of the two views ``orders`` of ``x``, mapped back to its frame."""
        if len(orders) != 2:
            raise ValueError(f"the cross-view block joins two views, got {len(orders)}")
        padded, size = self.pad(x)
        encoded = self.join_views(*(self.encode(permute(padded, order)) for order in orders))
        return [self.crop(unpermute(self.decode(skips, bottom), order), size)
                for (skips, bottom), order in zip(encoded, orders)]

    def join_views(self, a: tuple[list, torch.Tensor], b: tuple[list, torch.Tensor]) -> list[tuple[list, torch.Tensor]]:
        """The two views' encodings ``(skips, bottleneck)`` after the cross-view block at ``cross_attention_at``."""
        (skips_a, bottom_a), (skips_b, bottom_b) = a, b
        site = self.cross_attention_at
        if site == "bottleneck":
            bottom_a, bottom_b = self.cross_attention(bottom_a, bottom_b)
        elif site == "intermediate":  # the deepest skip (stage-4 Swin output), which decoder5 joins
            deep_a, deep_b = self.cross_attention(skips_a[-1], skips_b[-1])
            skips_a, skips_b = [*skips_a[:-1], deep_a], [*skips_b[:-1], deep_b]
        return [(skips_a, bottom_a), (skips_b, bottom_b)]


def fused_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log`` of the mean softmax of several outputs ``(B, K, ...)`` in one frame: the fused
    prediction (its argmax is that of the summed softmax), still usable as logits."""
    probs = sum(torch.softmax(x.float(), 1) for x in logits) / len(logits)
    return torch.log(probs.clamp_min(1e-12))
