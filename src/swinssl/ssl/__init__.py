"""Self-supervised pre-training: views (rotation, cut-out) and losses of Swin UNETR SSL."""

from swinssl.ssl.losses import inpainting_l1, ntxent, rotation_ce, weighted_sum
from swinssl.ssl.views import cutout, cutout_views, rotate, two_views

__all__ = ["cutout", "cutout_views", "inpainting_l1", "ntxent", "rotate", "rotation_ce", "two_views", "weighted_sum"]
