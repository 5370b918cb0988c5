"""3D Swin transformer encoder (Liu et al., ICCV 2021; as used by Swin UNETR, Hatamizadeh et al., 2022).

Parameter names and shapes equal those of ``monai.networks.nets.swin_unetr.SwinTransformer``
(``patch_embed.proj``, ``layers{1..4}.0.blocks.i.{norm1,attn.qkv,attn.proj,
attn.relative_position_bias_table,attn.relative_position_index,norm2,mlp.linear1,mlp.linear2}``,
``layers{1..4}.0.downsample.{norm,reduction}``, ``layers{1..4}c.0`` with ``use_v2``), so the
published weights load unchanged and MONAI serves as the numerical reference.

Differences from the reference that do not change results: on CPU, attention runs a few
windows at a time with a recomputing backward (``swinssl.nn.cpu_attention``), elsewhere
through ``F.scaled_dot_product_attention`` with the relative-position bias and the shift
mask as one additive mask; shift masks are kept per grid in training and built per forward
in inference; blocks can use activation checkpointing.

Tensors inside stages are channel-last: ``(B, D, H, W, C)``.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetrBasicBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinssl.nn.cpu_attention import window_attention
from swinssl.nn.dim import domain_invariance_module

# Attention logit added across shifted-window region borders; the reference uses -100, not -inf.
MASK_VALUE = -100.0


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability ``p`` and rescale the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def window_and_shift(grid: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> tuple[tuple, tuple]:
    """A window never exceeds the grid; where it covers the whole axis, there is no shift."""
    use_window, use_shift = list(window), list(shift)
    for i, size in enumerate(grid):
        if size <= window[i]:
            use_window[i], use_shift[i] = size, 0
    return tuple(use_window), tuple(use_shift)


def window_partition(x: torch.Tensor, window: Sequence[int]) -> torch.Tensor:
    """(B, D, H, W, C) -> (B * nW, wd * wh * ww, C); D, H, W divisible by the window."""
    b, d, h, w, c = x.shape
    x = x.view(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window[0] * window[1] * window[2], c)


def window_merge(windows: torch.Tensor, window: Sequence[int], b: int, d: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``window_partition``: (B * nW, N, C) -> (B, D, H, W, C)."""
    x = windows.view(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], -1)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, -1)


def shift_mask(grid: Sequence[int], window: Sequence[int], shift: Sequence[int], device: torch.device) -> torch.Tensor:
    """(nW, N, N) additive mask: 0 within a region of the cyclically shifted grid, ``MASK_VALUE`` across."""
    region = torch.zeros((1, *grid, 1), device=device)
    bounds = [(slice(0, -win), slice(-win, -s), slice(-s, None)) for win, s in zip(window, shift)]
    for n, (sd, sh, sw) in enumerate(itertools.product(*bounds)):
        region[:, sd, sh, sw, :] = n
    ids = window_partition(region, window).squeeze(-1)
    across = ids.unsqueeze(1) != ids.unsqueeze(2)
    return torch.zeros(across.shape, device=device).masked_fill_(across, MASK_VALUE)


def relative_position_index(window: Sequence[int]) -> torch.Tensor:
    """(N, N) index into the bias table for every pair of positions in a window."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3), each in [-(s-1), s-1]
    rel = rel + torch.tensor([s - 1 for s in window])
    strides = torch.tensor([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    return (rel * strides).sum(-1)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: (B, Cin, D, H, W) -> (B, C, D/p, H/p, W/p)."""

    def __init__(self, patch_size: Sequence[int], in_chans: int, embed_dim: int, norm: bool = False):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = [(-size) % p for size, p in zip(x.shape[2:], self.patch_size)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = self.proj(x)
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)
        return x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(F.gelu(self.linear1(x)), self.drop, self.training)
        return F.dropout(self.linear2(x), self.drop, self.training)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        table_size = (2 * window_size[0] - 1) * (2 * window_size[1] - 1) * (2 * window_size[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(table_size, num_heads))
        # Persistent, as in MONAI's state dicts (published checkpoints carry it).
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = proj_drop
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B * nW, N, C); mask: (nW, N, N) shift mask or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # A window smaller than the configured one uses the top-left block of the index, as MONAI does.
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, -1).permute(2, 0, 1)  # (heads, N, N)
        # CPU: chunked, cache-resident attention (see cpu_attention); GPUs keep SDPA's fused kernels, and so
        # do attention dropout (the chunked kernel has none) and torch.compile (it would unroll the chunk loop).
        if q.device.type == "cpu" and not (self.training and self.attn_drop) and not torch.compiler.is_compiling():
            x = window_attention(q, k, v, bias.to(q.dtype), None if mask is None else mask.to(q.dtype), self.scale)
        else:
            if mask is None:
                attn_mask = bias.unsqueeze(0)
            else:
                nw = mask.shape[0]
                attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).unsqueeze(0)  # (1, nW, heads, N, N)
                attn_mask = attn_mask.expand(bw // nw, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
            dropout = self.attn_drop if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask.to(q.dtype), dropout_p=dropout, scale=self.scale)
        x = self.proj(x.transpose(1, 2).reshape(bw, n, c))
        return F.dropout(x, self.proj_drop, self.training)


class SwinTransformerBlock(nn.Module):
    """(Shifted) window attention + MLP, each pre-norm with a residual: (B, D, H, W, C) -> same."""

    def __init__(self, dim: int, num_heads: int, window_size: Sequence[int], shift_size: Sequence[int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, use_checkpoint: bool = False):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(shift_size)
        self.use_checkpoint = use_checkpoint
        self.drop_path = drop_path
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, self.window_size, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def _attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, d, h, w, _ = x.shape
        window, shift = window_and_shift((d, h, w), self.window_size, self.shift_size)
        x = self.norm1(x)
        pads = [(-size) % win for size, win in zip((d, h, w), window)]
        if any(pads):
            x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
        shifted = any(shift)
        if shifted:
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        windows = self.attn(window_partition(x, window), mask if shifted else None)
        x = window_merge(windows, window, b, dp, hp, wp)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        if any(pads):
            x = x[:, :d, :h, :w, :].contiguous()
        return x

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        y = checkpoint(self._attention, x, mask, use_reentrant=False) if ckpt else self._attention(x, mask)
        x = x + drop_path(y, self.drop_path, self.training)
        y = checkpoint(self._mlp, x, use_reentrant=False) if ckpt else self._mlp(x)
        return x + drop_path(y, self.drop_path, self.training)


class PatchMergingV2(nn.Module):
    """2x2x2 neighbourhoods -> one token with twice the channels: (B, D, H, W, C) -> (B, D/2, H/2, W/2, 2C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    # Order in which the 8 neighbours are concatenated (d, h, w offsets); weights depend on it.
    offsets = list(itertools.product(range(2), range(2), range(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d, h, w = x.shape[1:4]
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.offsets], dim=-1)
        return self.reduction(self.norm(x))


class PatchMerging(PatchMergingV2):
    """The original (MONAI "merging") neighbour order, used by the released Swin UNETR weights."""

    offsets = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


MERGING = {"merging": PatchMerging, "mergingv2": PatchMergingV2}


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then patch merging.

    (B, C, D, H, W) -> (B, 2C, D/2, H/2, W/2).
    """

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: Sequence[int], drop_path: Sequence[float],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0,
                 downsample: str | None = "merging", use_checkpoint: bool = False):
        super().__init__()
        self.window_size = tuple(window_size)
        self.shift_size = tuple(s // 2 for s in window_size)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, num_heads, window_size, self.shift_size if i % 2 else (0, 0, 0), mlp_ratio,
                                 qkv_bias, drop, attn_drop, drop_path[i], use_checkpoint)
            for i in range(depth)
        )
        self.downsample = MERGING[downsample](dim) if downsample else None
        self._masks: dict[tuple, torch.Tensor] = {}

    def _mask(self, grid: Sequence[int], device: torch.device) -> torch.Tensor | None:
        window, shift = window_and_shift(grid, self.window_size, self.shift_size)
        if not any(shift):
            return None
        padded = tuple(-(-size // win) * win for size, win in zip(grid, window))
        if not torch.is_grad_enabled():
            # Inference: built per forward and freed with it. Kept, the first stage's mask (161 MB
            # at 96^3) would add to the decoder's peak; building it takes ~0.1 s.
            return shift_mask(padded, window, shift, device)
        key = (padded, window, shift, str(device))
        if key not in self._masks:  # training: one mask per grid, shared by the forwards of a step
            self._masks[key] = shift_mask(padded, window, shift, device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self._mask(x.shape[2:], x.device)
        x = x.permute(0, 2, 3, 4, 1)
        for block in self.blocks:
            x = block(x, mask)
        if self.downsample is not None:
            x = self.downsample(x)
        return x.permute(0, 4, 1, 2, 3)


class SwinTransformer(nn.Module):
    """Swin encoder: patch embedding + 4 stages. Returns 5 feature maps at strides 2, 4, 8, 16, 32.

    With ``feature_size`` C and patch 2 the outputs have C, 2C, 4C, 8C, 16C channels;
    ``normalize`` applies a parameter-free LayerNorm over channels to each output (as MONAI).
    """

    def __init__(self, in_chans: int, embed_dim: int, window_size: Sequence[int] = (7, 7, 7),
                 patch_size: Sequence[int] = (2, 2, 2), depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 patch_norm: bool = False, use_checkpoint: bool = False, downsample: str = "merging",
                 use_v2: bool = False):
        super().__init__()
        for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not 0 <= rate <= 1:  # NaN too
                raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
        for name, stages in (("depths", depths), ("num_heads", num_heads)):  # so equally many, too
            if len(stages) != 4:
                raise ValueError(f"{name} must have 4 entries, one per stage, got {tuple(stages)}")
        if downsample not in MERGING:
            raise ValueError(f"downsample must be one of {', '.join(MERGING)}, got {downsample!r}")
        for i, heads in enumerate(num_heads):
            if (embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i + 1}: {embed_dim * 2**i} channels are not divisible by {heads} heads")
        self.embed_dim = embed_dim
        self.use_v2 = use_v2
        self.merging = downsample  # the neighbour order of patch merging, which weights cannot tell (nn.load)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm=patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # stochastic depth grows linearly
        for i in range(4):
            dim = embed_dim * 2**i
            layer = BasicLayer(dim, depths[i], num_heads[i], window_size, rates[sum(depths[:i]) : sum(depths[: i + 1])],
                               mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, downsample, use_checkpoint)
            setattr(self, f"layers{i + 1}", nn.ModuleList([layer]))
            if use_v2:  # Swin UNETR v2: a residual conv block before each stage
                conv = UnetrBasicBlock(3, dim, dim, kernel_size=3, stride=1, norm_name="instance", res_block=True)
                setattr(self, f"layers{i + 1}c", nn.ModuleList([conv]))

    @staticmethod
    def proj_out(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        if not normalize:
            return x
        return F.layer_norm(x.permute(0, 2, 3, 4, 1), x.shape[1:2]).permute(0, 4, 1, 2, 3)

    def forward(self, x: torch.Tensor, normalize: bool = True, second: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The 5 feature maps of ``x``. ``second`` (another view) is for the domain-invariant variant."""
        if second is not None:
            raise ValueError("a second stream needs the domain-invariant encoder (model.encoder=domain_invariant_swin)")
        return self.stages(self.embed(x), normalize)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding ``(B, C, D/2, H/2, W/2)``, channel-first."""
        return self.pos_drop(self.patch_embed(x))

    def stages(self, x: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """The 5 feature maps from an embedding (itself the first, then the 4 stages')."""
        outs = [self.proj_out(x, normalize)]
        for i in range(1, 5):
            if self.use_v2:
                x = getattr(self, f"layers{i}c")[0](x.contiguous())
            x = getattr(self, f"layers{i}")[0](x.contiguous())
            outs.append(self.proj_out(x, normalize))
        return outs


class DomainInvariantSwinTransformer(SwinTransformer):
    """SwinFUSE's encoder (Talasila et al., 2024): the Swin encoder with the domain-invariance module
    (``nn.dim``; ``invariance.*`` keys) between the patch embedding and stage 1. Two streams (two
    views of one crop) co-attend there; ``forward`` takes the second as ``second`` (default: ``x``
    itself), and pre-training reads each gated stream on its own (``methods.model.SSLModel``).

    ``invariance_heads``: a list is the paper's co-attention stack (one layer per entry with that many
    heads), an integer the light module of one shared layer; ``invariance_pool``: keys and values
    average-pooled by this per axis."""

    def __init__(self, *args, invariance_heads: int | Sequence[int] = (3, 6, 12, 24), invariance_pool: int = 4,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.invariance = domain_invariance_module(self.embed_dim, invariance_heads, invariance_pool)

    def forward(self, x: torch.Tensor, normalize: bool = True, second: torch.Tensor | None = None) -> list[torch.Tensor]:
        x = self.embed(x)
        return self.stages(self.invariance(x, None if second is None else self.embed(second)), normalize)


# Encoder variants by the name ``model.encoder`` gives them; the second takes ``invariance_*`` arguments too.
ENCODERS: dict[str, type[SwinTransformer]] = {"swin": SwinTransformer,
                                              "domain_invariant_swin": DomainInvariantSwinTransformer}
