"""Axis orders of a volume ``(B, C, X, Y, Z)``: SwinMM's views, shared by its network, its
pre-training views (``swinssl.ssl.views``) and its inference."""

from __future__ import annotations

import torch

# The three spatial axis orders. Each is a transposition (or none), so each is its own
# inverse; ``unpermute`` works for any order all the same.
PERMUTATIONS: dict[str, tuple[int, int, int]] = {"identity": (0, 1, 2), "swap_xy": (1, 0, 2), "swap_xz": (2, 1, 0)}


def check_volume(x: torch.Tensor, name: str = "x") -> None:
    """ValueError unless ``x`` is a batch of volumes ``(B, C, D, H, W)``."""
    if x.ndim != 5:
        raise ValueError(f"expected {name} of shape (B, C, D, H, W), got shape {tuple(x.shape)}")


def permute(x: torch.Tensor, order: tuple[int, int, int]) -> torch.Tensor:
    """Spatial axes of ``(B, C, X, Y, Z)`` in ``order``: view axis i is input axis ``order[i]``."""
    check_volume(x)
    return x.permute(0, 1, *(2 + a for a in order))


def unpermute(x: torch.Tensor, order: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of ``permute(., order)``: back to the common frame."""
    check_volume(x)
    inverse = sorted(range(3), key=lambda i: order[i])
    return x.permute(0, 1, *(2 + a for a in inverse))
