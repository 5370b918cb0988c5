"""SwinFUSE's domain-invariance module (Talasila et al., 2024): two streams of patch embeddings
co-attend over spatial tokens before the first Swin stage.

Stream 1's tokens query stream 2's and vice versa (one multi-head attention, ``batch_first``,
shared by both directions; one pre-LayerNorm). The attention output gates the stream's own
embedding, ``e * 2 sigmoid(o)`` (1 where the output is 0, so an untrained module starts
close to the identity), and the encoder gets the two gated streams averaged -- or, in
pre-training, each gated stream on its own (the two views keep their own outputs for the
rotation, contrastive and inpainting tasks).

Keys and values are average-pooled by ``pool`` per axis: a 96^3 crop at feature 48 has
48^3 = 110592 query tokens but only 12^3 = 1728 key tokens at ``pool=4``, so the attention
fits a GPU (and runs through ``scaled_dot_product_attention``). Every sample attends only
within its own pair of streams: the published code attends across the batch instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DomainInvarianceModule(nn.Module):
    """``(B, C, d, h, w)`` x2 patch embeddings -> the two gated streams, same shapes."""

    def __init__(self, dim: int, num_heads: int = 4, pool: int = 4):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"domain-invariance module: {dim} channels do not split into {num_heads} heads")
        if pool < 1:
            raise ValueError(f"domain-invariance module: pool must be at least 1, got {pool}")
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool3d(x, self.pool, ceil_mode=True)
        return self.norm(x.flatten(2).transpose(1, 2))

    def gates(self, a: torch.Tensor, b: torch.Tensor, weights: bool = False):
        """Gates ``2 sigmoid(attention output)`` of streams a and b, ``(B, C, d, h, w)`` each; with
        ``weights`` also the attention each of a's key tokens receives from b's queries and vice
        versa, ``(B, d', h', w')`` (mean over queries and heads; for figures, memory ``L x L'``)."""
        if a.shape != b.shape:
            raise ValueError(f"streams differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
        qa, qb = (self.norm(x.flatten(2).transpose(1, 2)) for x in (a, b))
        ka, kb = self._keys(a), self._keys(b)
        oa, wa = self.attn(qa, kb, kb, need_weights=weights)  # stream 1 queries stream 2
        ob, wb = self.attn(qb, ka, ka, need_weights=weights)  # and the reverse
        ga, gb = (2 * torch.sigmoid(o.transpose(1, 2).reshape(a.shape)) for o in (oa, ob))
        if not weights:
            return ga, gb
        grid = [-(-s // self.pool) for s in a.shape[2:]]
        received = [w.mean(1).view(a.shape[0], *grid) for w in (wb, wa)]  # keys of a, keys of b
        return ga, gb, received[0], received[1]

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's input: the two gated streams averaged (``b=None``: ``a`` in both streams,
        as in fine-tuning and inference)."""
        b = a if b is None else b
        ga, gb = self.gates(a, b)
        return (a * ga + b * gb) / 2
