import pytest
import torch
from torch import nn

from swinssl.nn.heads import ContrastiveHead, PointwiseConv3d, ReconstructionHead, RotationHead

FEATURE = 12
DIM = 16 * FEATURE  # bottleneck channels of a feature-12 encoder


@pytest.fixture
def bottleneck():
    return torch.randn(2, DIM, 2, 2, 2, generator=torch.Generator().manual_seed(0))


def test_head_output_shapes_for_feature_12(bottleneck):
    torch.manual_seed(0)
    assert RotationHead(DIM)(bottleneck).shape == (2, 4)
    assert ContrastiveHead(DIM)(bottleneck).shape == (2, 512)
    with torch.no_grad():
        assert ReconstructionHead(DIM, 1)(bottleneck).shape == (2, 1, 64, 64, 64)


def test_rotation_head_reads_token_0_and_contrastive_head_token_1(bottleneck):
    torch.manual_seed(0)
    rotation, contrastive = RotationHead(DIM), ContrastiveHead(DIM)
    rot, con = rotation(bottleneck), contrastive(bottleneck)

    first = bottleneck.clone()
    first[:, :, 0, 0, 0] += 1.0  # token 0
    assert not torch.allclose(rotation(first), rot)
    assert torch.equal(contrastive(first), con)

    second = bottleneck.clone()
    second[:, :, 0, 0, 1] += 1.0  # token 1: raster order, last axis fastest
    assert torch.equal(rotation(second), rot)
    assert not torch.allclose(contrastive(second), con)

    elsewhere = bottleneck.clone()
    elsewhere[:, :, 1, 1, 1] += 1.0
    assert torch.equal(rotation(elsewhere), rot) and torch.equal(contrastive(elsewhere), con)


def test_contrastive_head_rejects_a_single_token_bottleneck():
    with pytest.raises(ValueError, match="64 voxels"):
        ContrastiveHead(DIM)(torch.zeros(2, DIM, 1, 1, 1))


def test_heads_name_a_bottleneck_with_the_wrong_channels():
    with pytest.raises(ValueError, match=r"\(2, 96, 2, 2, 2\)"):
        RotationHead(DIM)(torch.zeros(2, 96, 2, 2, 2))


def test_reconstruction_head_channel_plan_for_feature_12():
    head = ReconstructionHead(DIM, 1)
    convs = [m for m in head.layers if isinstance(m, nn.Conv3d)]
    assert [c.in_channels for c in convs] + [convs[-1].out_channels] == [192, 96, 48, 24, 12, 12, 1]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 5 + [(1, 1, 1)]
    # conv -> instance norm -> LeakyReLU -> 2x trilinear upsampling, five times, then the 1x1x1 conv.
    kinds = [type(m) for m in head.layers]
    assert kinds == [nn.Conv3d, nn.InstanceNorm3d, nn.LeakyReLU, nn.Upsample] * 5 + [PointwiseConv3d]
    ups = [m for m in head.layers if isinstance(m, nn.Upsample)]
    assert all(u.scale_factor == 2 and u.mode == "trilinear" and u.align_corners is False for u in ups)


@pytest.mark.parametrize("out_channels", [1, 5])
def test_pointwise_conv_equals_a_1x1x1_convolution_forward_and_backward(out_channels):
    torch.manual_seed(0)
    ours = PointwiseConv3d(12, out_channels)
    reference = nn.Conv3d(12, out_channels, kernel_size=1)
    assert list(ours.state_dict()) == list(reference.state_dict())  # checkpoints load either way
    with torch.no_grad():
        ours.bias.normal_()  # a bias far from zero, so dropping it shows
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 12, 6, 5, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), reference(x_ref)
    assert y.shape == (2, out_channels, 6, 5, 4)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)
