"""Swin UNETR (Hatamizadeh et al., 2022): Swin encoder + UNETR residual conv decoder.

State-dict compatible with ``monai.networks.nets.SwinUNETR`` (``swinViT.*``,
``encoder1..4``, ``encoder10``, ``decoder5..1``, ``out``). Unlike MONAI it accepts any
input size: the input is zero-padded to a multiple of 32 and the logits are cropped back.
An input of at most 32 voxels per axis has a one-voxel bottleneck, where MONAI's instance
norm refuses to run; there our ``encoder10`` takes the instance norm's value at one voxel
(zero: the voxel minus its own mean), so a 32^3 window costs a 32^3 forward pass. Plans
written before this rule padded the last axis to 64 instead (``single_voxel_bottleneck="pad"``,
twice the work), and keep doing so.

Sizes (``feature_size``): tiny 12, small 24, base 48, large 96; see ``swin_unetr``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn
from torch.utils.checkpoint import checkpoint

from swinssl.nn.swin_transformer import ENCODERS

SIZES = {"tiny": 12, "small": 24, "base": 48, "large": 96}


def check_arguments(in_channels: int, out_channels: int, feature_size: int, depths: Sequence[int],
                    num_heads: Sequence[int], window_size: int, patch_size: int, drop_rate: float,
                    attn_drop_rate: float, dropout_path_rate: float, single_voxel_bottleneck: str) -> None:
    """Refuse, before anything is built, arguments that cannot make a Swin UNETR: a ``ValueError``
    naming the argument and its value. MONAI's SwinUNETR refuses the rates and a ``feature_size``
    that is not a multiple of 12 the same way; the rest it accepts or fails on later, less clearly."""
    for name, size in (("in_channels", in_channels), ("out_channels", out_channels),
                       ("window_size", window_size), ("patch_size", patch_size)):
        if not size >= 1:
            raise ValueError(f"{name} must be at least 1, got {size!r}")
    if not (feature_size >= 12 and feature_size % 12 == 0):
        raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size!r}")
    for name, rate in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate),
                       ("dropout_path_rate", dropout_path_rate)):
        if not 0 <= rate <= 1:  # NaN too
            raise ValueError(f"{name} must be in [0, 1], got {rate!r}")
    for name, stages in (("depths", depths), ("num_heads", num_heads)):
        if isinstance(stages, str) or not hasattr(stages, "__len__") or len(stages) != 4:
            raise ValueError(f"{name} must have 4 entries, one per encoder stage (the decoder joins 4), got {stages!r}")
    if not all(depth >= 0 for depth in depths):
        raise ValueError(f"depths must not be negative, got {depths!r}")
    if not all(heads >= 1 for heads in num_heads):
        raise ValueError(f"num_heads must be at least 1 in every stage, got {num_heads!r}")
    if single_voxel_bottleneck not in ("exact", "pad"):
        raise ValueError(f"single_voxel_bottleneck must be 'exact' or 'pad', got {single_voxel_bottleneck!r}")


def swin_encoder(in_channels: int, feature_size: int, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 2,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, dropout_path_rate: float = 0.0,
                 use_checkpoint: bool = False, downsample: str = "merging", use_v2: bool = False, encoder: str = "swin",
                 invariance_heads: int | Sequence[int] = (3, 6, 12, 24), invariance_pool: int = 4) -> nn.Module:
    """The ``swinViT`` of a SwinUNETR with these arguments (SwinUNETR's names): the one map from them to
    the encoder variant ``encoder`` (``ENCODERS``) and its arguments. Pre-training builds its encoder here too."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    variant = {"invariance_heads": invariance_heads, "invariance_pool": invariance_pool} if encoder != "swin" else {}
    return ENCODERS[encoder](in_channels, feature_size, (window_size,) * 3, (patch_size,) * 3, depths, num_heads,
                             drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=dropout_path_rate,
                             use_checkpoint=use_checkpoint, downsample=downsample, use_v2=use_v2, **variant)


class SwinUNETR(nn.Module):
    """(B, in_channels, D, H, W) -> logits (B, out_channels, D, H, W), any D, H, W."""

    def __init__(self, in_channels: int = 1, out_channels: int = 14, feature_size: int = 48,
                 depths: Sequence[int] = (2, 2, 2, 2), num_heads: Sequence[int] = (3, 6, 12, 24),
                 window_size: int = 7, patch_size: int = 2, use_v2: bool = False, downsample: str = "merging",
                 norm_name: str = "instance", drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 dropout_path_rate: float = 0.0, normalize: bool = True, use_checkpoint: bool = False,
                 encoder: str = "swin", invariance_heads: int | Sequence[int] = (3, 6, 12, 24),
                 invariance_pool: int = 4, single_voxel_bottleneck: str = "exact"):
        check_arguments(in_channels, out_channels, feature_size, depths, num_heads, window_size, patch_size,
                        drop_rate, attn_drop_rate, dropout_path_rate, single_voxel_bottleneck)
        super().__init__()
        self.in_channels, self.feature_size, self.normalize = in_channels, feature_size, normalize
        self.use_checkpoint, self.single_voxel_bottleneck = use_checkpoint, single_voxel_bottleneck
        self.multiple = patch_size**5  # five halvings: patch embedding + four stages
        f = feature_size
        self.swinViT = swin_encoder(in_channels, f, depths, num_heads, window_size, patch_size, drop_rate, attn_drop_rate,
                                    dropout_path_rate, use_checkpoint, downsample, use_v2, encoder, invariance_heads,
                                    invariance_pool)

        def enc(cin: int, cout: int) -> UnetrBasicBlock:
            return UnetrBasicBlock(3, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=True)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(3, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name=norm_name, res_block=True)

        self.encoder1 = enc(in_channels, f)
        self.encoder2 = enc(f, f)
        self.encoder3 = enc(2 * f, 2 * f)
        self.encoder4 = enc(4 * f, 4 * f)
        self.encoder10 = enc(16 * f, 16 * f)
        if single_voxel_bottleneck == "exact":
            _define_one_voxel_instance_norm(self.encoder10)
        self.decoder5 = up(16 * f, 8 * f)
        self.decoder4 = up(8 * f, 4 * f)
        self.decoder3 = up(4 * f, 2 * f)
        self.decoder2 = up(2 * f, f)
        self.decoder1 = up(f, f)
        self.out = UnetOutBlock(3, f, out_channels)

    def forward(self, x: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        """``second``: another view of ``x`` (same shape) as the domain-invariance module's second
        stream (SwinFUSE fine-tuning); the conv path and the output follow ``x``."""
        padded, size = self.pad(x)
        skips, bottom = self.encode(padded, None if second is None else self.pad(second)[0])
        return self.crop(self.decode(skips, bottom), size)

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Input zero-padded to a multiple of 32 (any size works), and its original spatial size."""
        if x.ndim != 5:
            raise ValueError(f"expected input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        size = tuple(x.shape[2:])
        pads = [(-s) % self.multiple for s in size]
        if self.single_voxel_bottleneck == "pad" and all(s + p == self.multiple for s, p in zip(size, pads)):
            pads[2] += self.multiple  # older plans: two bottleneck voxels along the last axis
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        return x, size

    @staticmethod
    def crop(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(logits.shape[2:]) == tuple(size):
            return logits
        return logits[:, :, : size[0], : size[1], : size[2]]

    def encode(self, x: torch.Tensor, second: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The decoder's skip inputs (full resolution first) and the bottleneck, from a padded input."""
        hidden = self.swinViT(x, self.normalize, second=second)
        run = self._run
        skips = [run(self.encoder1, x), run(self.encoder2, hidden[0]), run(self.encoder3, hidden[1]),
                 run(self.encoder4, hidden[2]), hidden[3]]
        return skips, run(self.encoder10, hidden[4])

    def decode(self, skips: list[torch.Tensor], bottom: torch.Tensor) -> torch.Tensor:
        """UNETR decoder: up from the bottleneck, joining the skips."""
        run = self._run
        enc0, enc1, enc2, enc3, hidden3 = skips
        dec3 = run(self.decoder5, bottom, hidden3)
        dec2 = run(self.decoder4, dec3, enc3)
        dec1 = run(self.decoder3, dec2, enc2)
        dec0 = run(self.decoder2, dec1, enc1)
        return self.out(run(self.decoder1, dec0, enc0))

    def _run(self, block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        # The full-resolution conv blocks hold most of the activation memory: recompute them in backward.
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)


class OneVoxelInstanceNorm3d(nn.InstanceNorm3d):
    """``nn.InstanceNorm3d`` that also normalises a single voxel: each channel minus its own mean is
    zero there, so the output is zero (plus the affine bias), where torch raises instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:].numel() == 1 and not self.track_running_stats:
            # Exactly zero, but computed from x: the layers before it stay in the graph (with zero
            # gradients), so DDP does not stop on parameters that were not used.
            out = x - x.mean(dim=(2, 3, 4), keepdim=True)
            return out + self.bias.view(1, -1, 1, 1, 1) if self.affine else out
        return super().forward(x)


def _define_one_voxel_instance_norm(block: nn.Module) -> None:
    """Swap ``block``'s instance norms for ``OneVoxelInstanceNorm3d`` (same settings and state keys)."""
    for name, module in list(block.named_modules()):
        if type(module) is nn.InstanceNorm3d:
            parent = block.get_submodule(name.rpartition(".")[0])
            swapped = OneVoxelInstanceNorm3d(module.num_features, module.eps, module.momentum, module.affine,
                                             module.track_running_stats)
            swapped.load_state_dict(module.state_dict())
            setattr(parent, name.rpartition(".")[2], swapped)


def swin_unetr(size: str = "base", **kwargs) -> SwinUNETR:
    """A SwinUNETR of a named size (tiny/small/base/large = feature 12/24/48/96)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    return SwinUNETR(feature_size=SIZES[size], **kwargs)
