"""Constructor argument checks of SwinUNETR and its Swin encoder (issue 33, item 5).

A bad argument is a ValueError that names the argument and its value, raised before any layer is
built. MONAI's SwinUNETR refuses the out-of-range rates and a feature_size that is not a multiple
of 12 the same way; there it serves as the reference. Tiny networks and no forward passes: fast.
"""

import importlib
import math
import re

import pytest
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from swinssl.nn.swin_transformer import SwinTransformer
from swinssl.nn.swin_unetr import SwinUNETR

# The module (``swinssl.nn.swin_unetr`` as an attribute is the ``swin_unetr`` function).
swin_unetr_module = importlib.import_module("swinssl.nn.swin_unetr")

TINY = dict(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1))

# (argument, bad value, whether MONAI 1.6 refuses it with a ValueError of its own). Where MONAI does
# not, it either accepts the value (depths of 3 stages, 5 heads, 0 channels, patch_size 0) or fails
# later with another error (IndexError, ZeroDivisionError, RuntimeError from torch).
SWIN_UNETR_CASES = [
    ("drop_rate", -0.1, True),
    ("drop_rate", 1.5, True),
    ("attn_drop_rate", 4, True),
    ("attn_drop_rate", -0.5, True),
    ("dropout_path_rate", -1, True),
    ("dropout_path_rate", 1.01, True),
    ("dropout_path_rate", math.nan, True),
    ("feature_size", 18, True),  # 18 * 2**i splits into the default heads: only this check refuses it
    ("feature_size", 50, True),
    ("feature_size", 0, False),
    ("feature_size", -12, False),
    ("depths", (2, 2, 2), False),
    ("depths", (2, 2, 2, 2, 2), False),
    ("depths", 2, False),
    ("depths", (1, -1, 1, 1), False),
    ("num_heads", (3, 6, 12), False),
    ("num_heads", (3, 6, 12, 24, 48), False),
    ("num_heads", (0, 6, 12, 24), False),
    ("in_channels", 0, False),
    ("in_channels", -1, False),
    ("out_channels", 0, False),
    ("out_channels", -2, False),
    ("window_size", 0, False),
    ("patch_size", 0, False),
    ("patch_size", -1, False),
    ("single_voxel_bottleneck", "crop", False),  # ours only
]

ENCODER = dict(in_chans=1, embed_dim=12, depths=(1, 1, 1, 1))
ENCODER_CASES = [
    ("drop_rate", 1.5),
    ("drop_rate", -0.1),
    ("attn_drop_rate", 4),
    ("drop_path_rate", -1),
    ("drop_path_rate", math.nan),
    ("depths", (1, 1, 1)),
    ("num_heads", (3, 6, 12, 24, 48)),
]


def names(value, *, argument) -> re.Pattern:
    """The argument as a whole word (``drop_rate`` is not ``attn_drop_rate``), then its value."""
    shown = re.escape(repr(tuple(value) if isinstance(value, list) else value))
    return re.compile(rf"(?<![\w.]){re.escape(argument)}\b.*{shown}")


def case_id(case) -> str:
    return f"{case[0]}={case[1]!r}"


def refuse_to_build(*args, **kwargs):
    raise AssertionError("the Swin encoder was built before the arguments were checked")


@pytest.mark.parametrize("argument, value, monai_checks", SWIN_UNETR_CASES, ids=[case_id(c) for c in SWIN_UNETR_CASES])
def test_swin_unetr_refuses_a_bad_argument_by_name_before_building(monkeypatch, argument, value, monai_checks):
    monkeypatch.setattr(swin_unetr_module, "ENCODERS", dict.fromkeys(swin_unetr_module.ENCODERS, refuse_to_build))
    with pytest.raises(ValueError, match=names(value, argument=argument)):
        SwinUNETR(**{**TINY, argument: value})


MONAI_CASES = [case for case in SWIN_UNETR_CASES if case[2]]


@pytest.mark.parametrize("argument, value, monai_checks", MONAI_CASES, ids=[case_id(c) for c in MONAI_CASES])
def test_monai_refuses_the_same_arguments(argument, value, monai_checks):
    # MONAI 1.6 signature: no img_size; spatial_dims (ours is 3-D only, without that argument) left at 3.
    with pytest.raises(ValueError):
        MonaiSwinUNETR(**{**TINY, argument: value})


@pytest.mark.parametrize("argument, value", ENCODER_CASES, ids=[case_id(c) for c in ENCODER_CASES])
def test_encoder_refuses_a_bad_argument_by_name(argument, value):
    with pytest.raises(ValueError, match=names(value, argument=argument)):
        SwinTransformer(**{**ENCODER, argument: value})


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_boundary_values_construct(rate):
    net = SwinUNETR(in_channels=1, out_channels=1, feature_size=12, depths=(0, 1, 1, 1), window_size=1,
                    patch_size=1, drop_rate=rate, attn_drop_rate=rate, dropout_path_rate=rate)
    block = net.swinViT.layers4[0].blocks[0]  # the last block: stochastic depth reaches the full rate there
    assert net.swinViT.pos_drop.p == block.attn.attn_drop == block.drop_path == rate
    encoder = SwinTransformer(**ENCODER, drop_rate=rate, attn_drop_rate=rate, drop_path_rate=rate)
    assert encoder.embed_dim == 12
    # Sequences of any kind: a plan read back from a checkpoint holds lists.
    SwinUNETR(**{**TINY, "depths": [1, 1, 1, 1], "num_heads": [3, 6, 12, 24]})
