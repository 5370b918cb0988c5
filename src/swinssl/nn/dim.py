"""SwinFUSE's domain-invariance module (Talasila et al., 2024): two streams of patch embeddings
co-attend over spatial tokens before the first Swin stage.

Two forms, chosen by ``model.invariance_heads`` (``domain_invariance_module``):

* a list, ``[3, 6, 12, 24]`` in the presets: **the paper's** (sec. 2.2, Eq. 1)
  ``P1 . Psi1(Q2, K1, V1) + P2 . Psi2(Q1, K2, V2)``. Each stream has its own stack ``Psi`` of
  co-attention layers, one per entry, with that many heads and a width doubling per layer from
  the feature size (48, 96, 192, 384 at feature 48). Layer ``l`` of stream 1's stack takes its
  queries from stream 2's layer ``l - 1`` and its keys and values from its own
  (``DomainInvarianceModule``).
* an integer, ``4``: the **light** module, one attention layer with that many heads shared by
  both directions, each stream querying the other (``LightDomainInvarianceModule``; the form of
  checkpoints written before the paper's form existed, which load unchanged).

In both, a stream's attention output gates its own embedding, ``P * 2 sigmoid(o)``, and the
encoder gets the two gated streams averaged -- or, in pre-training, each gated stream on its
own (the two views keep their own outputs for the rotation, contrastive and inpainting tasks).
The paper's stack ends in a zero-initialised projection to the feature size, so an untrained
module is exactly the identity (the gate is 1).

Keys and values are average-pooled by ``pool`` per axis: a 96^3 crop at feature 48 has
48^3 = 110592 query tokens but only 12^3 = 1728 key tokens at ``pool=4``, so the attention
fits a GPU (``benchmarks/dim_memory.py`` measures both forms). Every sample attends only
within its own pair of streams: the published code attends across the batch instead.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _check(dim: int, heads: Sequence[int], pool: int) -> None:
    for i, h in enumerate(heads):
        width = dim * 2**i
        if h < 1 or width % h:
            raise ValueError(f"domain-invariance module: layer {i + 1}'s {width} channels do not split into {h} heads")
    if pool < 1:
        raise ValueError(f"domain-invariance module: pool must be at least 1, got {pool}")


def pooled_tokens(x: torch.Tensor, pool: int) -> torch.Tensor:
    """``(B, C, d, h, w)`` -> ``(B, L', C)`` tokens, average-pooled by ``pool`` per axis."""
    if pool > 1:
        x = F.avg_pool3d(x, pool, ceil_mode=True)
    return x.flatten(2).transpose(1, 2)


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, grid: Sequence[int]) -> torch.Tensor:
    """The attention each key token receives, ``(B, *grid)``: the softmax of ``q k^T / sqrt(c)``
    over keys, averaged over queries and heads. Memory ``L x L'`` per head: for figures."""
    b, length, width = q.shape
    qh = q.view(b, length, heads, -1).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    weights = torch.softmax(qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5, dim=-1)
    return weights.mean((1, 2)).view(b, *grid)


class CoAttentionLayer(nn.Module):
    """One layer of a stream's stack, ``Psi(Q_partner, K_own, V_own)``: tokens ``(B, L, c_in)``
    of both streams -> ``(B, L, c_out)`` aligned with the partner's (query) tokens. Pre-LayerNorm,
    queries full resolution, keys and values from the own stream pooled by ``pool``."""

    def __init__(self, dim_in: int, dim_out: int, heads: int, pool: int):
        super().__init__()
        self.heads, self.pool = heads, pool
        self.norm_query = nn.LayerNorm(dim_in)
        self.norm_own = nn.LayerNorm(dim_in)
        self.query = nn.Linear(dim_in, dim_out)
        self.key_value = nn.Linear(dim_in, 2 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def _qkv(self, partner: torch.Tensor, own: torch.Tensor, grid: Sequence[int]):
        b, length, width = own.shape
        own_grid = self.norm_own(own).transpose(1, 2).reshape(b, width, *grid)
        q = self.query(self.norm_query(partner))
        k, v = self.key_value(pooled_tokens(own_grid, self.pool)).chunk(2, dim=-1)
        return q, k, v

    def forward(self, partner: torch.Tensor, own: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        q, k, v = self._qkv(partner, own, grid)
        b, length, width = q.shape
        split = [t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*split)
        return self.proj(out.transpose(1, 2).reshape(b, length, width))

    def received(self, partner: torch.Tensor, own: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """The attention each of the own stream's pooled key tokens receives, ``(B, *pooled grid)``."""
        q, k, _ = self._qkv(partner, own, grid)
        return received_attention(q, k, self.heads, [-(-s // self.pool) for s in grid])


class DomainInvarianceModule(nn.Module):
    """The paper's module (Eq. 1): ``(B, C, d, h, w)`` x2 patch embeddings -> the two gated
    streams, same shapes. ``heads``: one co-attention layer per entry, layer ``i`` of width
    ``C 2^i`` (the paper: ``[3, 6, 12, 24]`` at C = 48)."""

    def __init__(self, dim: int, heads: Sequence[int] = (3, 6, 12, 24), pool: int = 4):
        super().__init__()
        heads = list(heads)
        if not heads:
            raise ValueError("domain-invariance module: model.invariance_heads needs at least one layer")
        _check(dim, heads, pool)

        def stack() -> nn.ModuleList:  # layer i: width C 2^(i-1) in, C 2^i out
            return nn.ModuleList(CoAttentionLayer(dim * 2 ** max(i - 1, 0), dim * 2**i, h, pool)
                                 for i, h in enumerate(heads))

        self.stream1, self.stream2 = stack(), stack()  # Psi1 (keys of stream 1), Psi2 (keys of stream 2)
        last = dim * 2 ** (len(heads) - 1)
        self.out1, self.out2 = nn.Linear(last, dim), nn.Linear(last, dim)
        for out in (self.out1, self.out2):  # gate 2 sigmoid(0) = 1: an untrained module is the identity
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def gates(self, a: torch.Tensor, b: torch.Tensor, weights: bool = False):
        """Gates ``2 sigmoid(o)`` of streams a and b, ``(B, C, d, h, w)`` each, where stream a's
        ``o`` is its stack's output ``Psi1(Q_b, K_a, V_a)``. With ``weights`` also the attention
        each of a's (then b's) pooled key tokens receives from the other's queries in the first
        layer, ``(B, d', h', w')`` (mean over queries and heads; for figures)."""
        if a.shape != b.shape:
            raise ValueError(f"streams differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
        grid = a.shape[2:]
        s1, s2 = (x.flatten(2).transpose(1, 2) for x in (a, b))
        first = (self.stream1[0].received(s2, s1, grid), self.stream2[0].received(s1, s2, grid)) if weights else ()
        for layer1, layer2 in zip(self.stream1, self.stream2):
            s1, s2 = layer1(s2, s1, grid), layer2(s1, s2, grid)
        ga, gb = (2 * torch.sigmoid(out(s).transpose(1, 2).reshape(a.shape))
                  for out, s in ((self.out1, s1), (self.out2, s2)))
        return (ga, gb, *first) if weights else (ga, gb)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's input: the two gated streams averaged (``b=None``: ``a`` in both streams,
        as in inference)."""
        b = a if b is None else b
        ga, gb = self.gates(a, b)
        return (a * ga + b * gb) / 2


class LightDomainInvarianceModule(nn.Module):
    """The light module: one multi-head attention (``batch_first``) shared by both directions,
    one pre-LayerNorm; stream a's queries over stream b's pooled keys gate a, and the reverse.
    ``(B, C, d, h, w)`` x2 -> the two gated streams."""

    def __init__(self, dim: int, num_heads: int = 4, pool: int = 4):
        super().__init__()
        _check(dim, [num_heads], pool)
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(pooled_tokens(x, self.pool))

    def gates(self, a: torch.Tensor, b: torch.Tensor, weights: bool = False):
        """Gates of streams a and b; with ``weights`` also the attention each of a's pooled key
        tokens receives from b's queries and vice versa, ``(B, d', h', w')``."""
        if a.shape != b.shape:
            raise ValueError(f"streams differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")
        qa, qb = (self.norm(x.flatten(2).transpose(1, 2)) for x in (a, b))
        ka, kb = self._keys(a), self._keys(b)
        oa, wa = self.attn(qa, kb, kb, need_weights=weights)  # stream a queries stream b
        ob, wb = self.attn(qb, ka, ka, need_weights=weights)  # and the reverse
        ga, gb = (2 * torch.sigmoid(o.transpose(1, 2).reshape(a.shape)) for o in (oa, ob))
        if not weights:
            return ga, gb
        grid = [-(-s // self.pool) for s in a.shape[2:]]
        received = [w.mean(1).view(a.shape[0], *grid) for w in (wb, wa)]  # keys of a, keys of b
        return ga, gb, received[0], received[1]

    forward = DomainInvarianceModule.forward


def domain_invariance_module(dim: int, heads: int | Sequence[int], pool: int) -> nn.Module:
    """The module ``model.invariance_heads`` names: a list -> the paper's stack, an integer -> the light one."""
    if isinstance(heads, int):
        return LightDomainInvarianceModule(dim, heads, pool)
    return DomainInvarianceModule(dim, heads, pool)
