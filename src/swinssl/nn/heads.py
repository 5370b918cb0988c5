"""Heads on the Swin encoder: the Swin UNETR self-supervised pre-training heads (Tang et al., CVPR
2022, sec. 3.2), and the frozen-encoder probe's light head (``ProbeHead``, ``FrozenEncoderProbe``).

All three read the encoder's last stage, the bottleneck feature map ``(B, 16C, d, h, w)``
with C the feature size (``in_dim = 16C``; 768 for the base model). Its tokens are
``x.flatten(2).transpose(1, 2)``, ``(B, d*h*w, 16C)``, in (d, h, w) raster order.

As in the reference ``SSLHead`` (research-contributions ``SwinUNETR/Pretrain``), the
rotation head reads token 0 and the contrastive head token 1, and the reconstruction
head is the reference's "vae" upsampler; its ``layers`` indices equal the reference's
``conv`` indices, so reference weights load after renaming ``conv.`` to ``layers.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _check_bottleneck(x: torch.Tensor, in_dim: int) -> None:
    if x.ndim != 5 or x.shape[1] != in_dim:
        raise ValueError(f"expected a bottleneck of shape (B, {in_dim}, d, h, w), got shape {tuple(x.shape)}")


def bottleneck_token(x: torch.Tensor, index: int) -> torch.Tensor:
    """Token ``index`` of a bottleneck ``(B, E, d, h, w)`` in raster order -> ``(B, E)``."""
    return x.flatten(2)[:, :, index]


class RotationHead(nn.Module):
    """Rotation prediction (Tang et al., CVPR 2022, sec. 3.2): which quarter turn was applied.

    A linear layer on bottleneck token 0 (voxel [0, 0, 0]):
    ``(B, in_dim, d, h, w) -> (B, num_classes)`` logits.
    """

    def __init__(self, in_dim: int, num_classes: int = 4):
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_bottleneck(x, self.in_dim)
        return self.fc(bottleneck_token(x, 0))


class ContrastiveHead(nn.Module):
    """Contrastive coding (Tang et al., CVPR 2022, sec. 3.2): an embedding for NT-Xent.

    A linear layer on bottleneck token 1 (voxel [0, 0, 1] when w > 1):
    ``(B, in_dim, d, h, w) -> (B, out_dim)``. Token 0 belongs to the rotation head, so the
    bottleneck needs at least two tokens.
    """

    def __init__(self, in_dim: int, out_dim: int = 512):
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_bottleneck(x, self.in_dim)
        if x.shape[2:].numel() < 2:
            raise ValueError(
                f"the contrastive head reads bottleneck token 1, but the bottleneck {tuple(x.shape)} has a single "
                "token: SSL crops need at least 64 voxels along one axis (a 32^3 crop has one bottleneck token)"
            )
        return self.fc(bottleneck_token(x, 1))


def _upsample_level(cin: int, cout: int) -> list[nn.Module]:
    return [
        nn.Conv3d(cin, cout, kernel_size=3, stride=1, padding=1),
        nn.InstanceNorm3d(cout),
        nn.LeakyReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
    ]


class PointwiseConv3d(nn.Conv3d):
    """A 1x1x1 convolution computed as a product with the ``(out, in)`` weight matrix.

    ``(B, in, d, h, w) -> (B, out, d, h, w)``; the parameters and state keys of ``nn.Conv3d``.
    On CPU, oneDNN's convolution is slow at a 1x1x1 kernel with one output channel (the
    reconstruction's last layer): forward and backward, the product is 5-17x faster, from the
    tiny demo's crops to the base model's (``benchmarks/pointwise_conv.py``).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *size = x.shape
        o, flat = self.out_channels, x.reshape(n, c, -1)
        # One batched product with the bias as its addend; an unbatched weight broadcast by matmul
        # has a backward several times slower.
        y = torch.baddbmm(self.bias.view(1, o, 1).expand(n, o, flat.shape[-1]),
                          self.weight.view(1, o, c).expand(n, o, c), flat)
        return y.view(n, o, *size)


class ReconstructionHead(nn.Module):
    """Masked-volume inpainting (Tang et al., CVPR 2022, sec. 3.2): restore the un-cut view.

    ``levels`` times (3x3x3 conv -> instance norm -> LeakyReLU -> 2x trilinear upsampling),
    halving the channels at every level but the last, then a 1x1x1 conv. For the default
    5 levels and ``in_dim = 16C``: 16C -> 8C -> 4C -> 2C -> C -> C -> ``out_channels``.

    ``(B, in_dim, d, h, w) -> (B, out_channels, 2^levels d, 2^levels h, 2^levels w)``,
    i.e. back to the crop size for the Swin encoder's total stride of 32.
    """

    def __init__(self, in_dim: int, out_channels: int, levels: int = 5):
        super().__init__()
        if levels < 1 or in_dim % 2 ** (levels - 1):
            raise ValueError(f"in_dim {in_dim} must be divisible by 2^(levels - 1) for levels={levels}")
        self.in_dim = in_dim
        channels = [in_dim] + [in_dim // 2 ** min(i, levels - 1) for i in range(1, levels + 1)]
        modules = [m for cin, cout in zip(channels, channels[1:]) for m in _upsample_level(cin, cout)]
        modules.append(PointwiseConv3d(channels[-1], out_channels))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_bottleneck(x, self.in_dim)
        return self.layers(x)


class ProbeHead(nn.Module):
    """Encoder feature maps (C, 2C, 4C, 8C, 16C channels; strides 2..32) -> logits ``(B, K, d, h, w)`` on
    the stride-2 grid of the first map: each map projected to the classes (1x1x1), and the
    projections summed from the coarsest up, upsampling (trilinear) the running sum to the next
    map's grid, as a feature pyramid does: linear in the features, with a third of the work of
    upsampling each map to the finest grid. ``FrozenEncoderProbe`` upsamples the sum to the input."""

    def __init__(self, feature_size: int, num_classes: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Conv3d(feature_size * 2**i, num_classes, 1) for i in range(5))

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        logits = self.projections[4](hidden[4])
        for i in range(3, -1, -1):
            up = F.interpolate(logits, size=hidden[i].shape[2:], mode="trilinear", align_corners=False)
            logits = self.projections[i](hidden[i]) + up
        return logits


class FrozenEncoderProbe(nn.Module):
    """A frozen Swin encoder (``swinViT``, eval mode, no gradient) and a trainable ``ProbeHead``."""

    def __init__(self, encoder: nn.Module, feature_size: int, num_classes: int, multiple: int = 32):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.head = ProbeHead(feature_size, num_classes)
        self.multiple = multiple

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: dropout and drop-path stay off
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        pads = [(-s) % self.multiple for s in size]
        padded = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0])) if any(pads) else x
        with torch.no_grad():
            hidden = self.encoder(padded, normalize=True)
        logits = F.interpolate(self.head(hidden), size=padded.shape[2:], mode="trilinear", align_corners=False)
        return logits[:, :, : size[0], : size[1], : size[2]]
