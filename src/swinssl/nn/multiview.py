"""SwinMM's multi-view SwinUNETR (Wang et al., MICCAI 2023, sec. 2.2): two views of a crop
(axis permutations) through one SwinUNETR, meeting at the bottleneck in a cross-view
attention block, each decoded and mapped back to the common frame.

State dict: SwinUNETR's keys plus ``cross_attention.*``, so a SwinUNETR checkpoint (or
SwinMM pre-trained encoder) loads into it with only the block missing.
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
    """Each view's bottleneck tokens attend to the other view's (shared Q/K/V and output
    projections, one pre-LayerNorm shared by both views, multi-head).

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


class MultiViewSwinUNETR(SwinUNETR):
    """SwinUNETR with a ``CrossViewAttention`` block on the bottleneck.

    ``model(x, orders=(o1, o2))``: logits of the two views of ``x``, both in ``x``'s frame
    (training). ``model(x)``: the fused prediction, ``log`` of the mean softmax over the view
    pairs (identity, swap_xy), (swap_xy, swap_xz), (swap_xz, identity) -- each view twice, as
    SwinMM's test-time fusion -- usable as logits (its softmax is the fused probability).
    Heads: one per 32 bottleneck channels (24 at feature size 48, as SwinMM).
    """

    def __init__(self, *args, cross_residual: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.config["multiview"] = True
        self.config["cross_residual"] = cross_residual
        dim = 16 * self.config["feature_size"]
        self.cross_attention = CrossViewAttention(dim, max(1, dim // 32), residual=cross_residual)

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
        encoded = [self.encode(permute(padded, order)) for order in orders]
        bottoms = self.cross_attention(encoded[0][1], encoded[1][1])
        return [self.crop(unpermute(self.decode(skips, bottom), order), size)
                for (skips, _), bottom, order in zip(encoded, bottoms, orders)]


def fused_log_probs(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log`` of the mean softmax of several outputs ``(B, K, ...)`` in one frame: the fused
    prediction (its argmax is that of the summed softmax), still usable as logits."""
    probs = sum(torch.softmax(x.float(), 1) for x in logits) / len(logits)
    return torch.log(probs.clamp_min(1e-12))
