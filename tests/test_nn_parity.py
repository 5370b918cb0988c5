"""Our SwinUNETR against MONAI's: same keys, same outputs, same gradients."""

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

import swinssl.nn.swin_transformer as swin_module
from swinssl.nn import SwinUNETR, swin_unetr

# Forward parity: feature, use_v2, downsample, in_channels, input shape (B, D, H, W)
FORWARD_CASES = [
    (12, False, "merging", 1, (1, 64, 64, 64)),
    (24, True, "merging", 4, (2, 64, 64, 64)),
    (12, False, "mergingv2", 1, (1, 96, 64, 64)),
    (48, False, "merging", 1, (1, 64, 64, 64)),
]
# Gradient parity on smaller inputs (MONAI's backward dominates the suite's time on CPU)
GRADIENT_CASES = [
    (12, False, "merging", 1, (1, 64, 64, 32)),
    (24, True, "merging", 4, (1, 64, 32, 64)),
    (12, True, "mergingv2", 2, (1, 32, 64, 64)),
    (48, False, "merging", 1, (1, 64, 32, 32)),
]


def pair(feature, use_v2, downsample, in_channels, out_channels=3):
    torch.manual_seed(0)
    ref = MonaiSwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature,
                         use_v2=use_v2, downsample=downsample)
    ours = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature,
                     use_v2=use_v2, downsample=downsample)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("feature, use_v2, downsample, in_channels, shape", FORWARD_CASES)
def test_outputs_match_monai(feature, use_v2, downsample, in_channels, shape):
    ref, ours = pair(feature, use_v2, downsample, in_channels)
    x = torch.randn(shape[0], in_channels, *shape[1:])
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("feature, use_v2, downsample, in_channels, shape", GRADIENT_CASES)
def test_gradients_match_monai_in_train_mode(feature, use_v2, downsample, in_channels, shape):
    ref, ours = pair(feature, use_v2, downsample, in_channels)
    x = torch.randn(shape[0], in_channels, *shape[1:])
    target = torch.randn(shape[0], 3, *shape[1:])
    ref.train(), ours.train()
    ((ref(x) - target) ** 2).mean().backward()
    ((ours(x) - target) ** 2).mean().backward()
    ref_grads = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-4, rtol=1e-3, msg=name)


def test_state_dict_keys_and_shapes_equal_monai_both_ways():
    ref, ours = pair(24, True, "merging", 4)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)  # ours -> MONAI, strictly


def test_encoder_matches_monai_at_32_cubed():
    # MONAI's full network cannot run 32^3 (one bottleneck voxel); its encoder can.
    ref, ours = pair(12, False, "merging", 1)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours.swinViT(x), ref.swinViT(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(32, 32, 32), (37, 50, 29), (17, 64, 40), (5, 6, 7)])
def test_any_input_size_gives_same_size_logits(shape):
    net = swin_unetr("tiny", in_channels=1, out_channels=2).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, *shape)).shape == (1, 2, *shape)


def test_padding_is_invisible_at_multiples_of_32():
    net = swin_unetr("tiny", out_channels=2).eval()
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.decode(*net.encode(x)))


def _network_input_shapes(net, x):
    seen = []
    handle = net.swinViT.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[2:])))
    with torch.no_grad():
        out = net(x)
    handle.remove()
    return seen, out


def test_a_32_cube_runs_unpadded_with_the_one_voxel_instance_norm():
    net = swin_unetr("tiny", out_channels=2).eval()
    seen, out = _network_input_shapes(net, torch.randn(2, 1, 32, 32, 32))
    assert seen == [(32, 32, 32)] and out.shape == (2, 2, 32, 32, 32)
    # One bottleneck voxel: each instance norm of MONAI's residual block gives zero there, so the
    # block is LeakyReLU(0 + its input).
    bottom = torch.randn(2, 192, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(net.encoder10(bottom), torch.nn.functional.leaky_relu(bottom, 0.01))
        # Above one voxel the swapped norm is torch's instance norm.
        bigger = torch.randn(2, 192, 1, 1, 2)
        reference = MonaiSwinUNETR(1, 2, feature_size=12).encoder10
        reference.load_state_dict(net.encoder10.state_dict())
        torch.testing.assert_close(net.encoder10(bigger), reference(bigger))


def test_legacy_rule_pads_a_32_cube_to_64_along_the_last_axis():
    net = swin_unetr("tiny", out_channels=2, single_voxel_bottleneck="pad").eval()
    seen, out = _network_input_shapes(net, torch.randn(1, 1, 32, 32, 32))
    assert seen == [(32, 32, 64)] and out.shape == (1, 2, 32, 32, 32)
    assert net.single_voxel_bottleneck == "pad"
    with pytest.raises(ValueError, match="single_voxel_bottleneck must be 'exact' or 'pad', got 'crop'"):
        swin_unetr("tiny", single_voxel_bottleneck="crop")


def _count_attention_calls(monkeypatch, net, x):
    calls = {"chunked": 0, "sdpa": []}
    chunked, sdpa = swin_module.window_attention, torch.nn.functional.scaled_dot_product_attention

    def counting_chunked(*args, **kwargs):
        calls["chunked"] += 1
        return chunked(*args, **kwargs)

    def counting_sdpa(*args, **kwargs):
        calls["sdpa"].append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(swin_module, "window_attention", counting_chunked)
    monkeypatch.setattr(swin_module.F, "scaled_dot_product_attention", counting_sdpa)
    net(x).mean().backward()
    return calls


def test_cpu_attention_is_chunked_and_attention_dropout_goes_through_sdpa(monkeypatch):
    x = torch.randn(1, 1, 64, 64, 32)
    calls = _count_attention_calls(monkeypatch, swin_unetr("tiny", out_channels=2).train(), x)
    assert calls == {"chunked": 8, "sdpa": []}  # 4 stages x 2 blocks
    # The chunked kernel has no attention dropout: with it, training falls back to SDPA (bias + shift mask).
    dropped = SwinUNETR(feature_size=12, out_channels=2, attn_drop_rate=0.1).train()
    calls = _count_attention_calls(monkeypatch, dropped, x)
    assert calls["chunked"] == 0 and calls["sdpa"] == [True] * 8


def _attention_inputs(windows, heads, n, d, per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(windows, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    bias = (0.3 * torch.randn(heads, n, n, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.where(torch.rand(per_image, n, n, generator=g) > 0.5, -100.0, 0.0).double()
    return [t.requires_grad_() for t in (q, k, v)] + [bias], mask


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 5 * 5 * 8 * 2, 2**30])  # 1 window, 2 windows (straddling images), all
@pytest.mark.parametrize("shifted", [False, True])
def test_chunked_window_attention_equals_the_formula(monkeypatch, chunk_bytes, shifted):
    from swinssl.nn import cpu_attention

    monkeypatch.setattr(cpu_attention, "CHUNK_BYTES", chunk_bytes)
    (q, k, v, bias), mask = _attention_inputs(windows=6, heads=3, n=5, d=2, per_image=3)
    mask = mask if shifted else None
    scale = 0.7
    out = cpu_attention.window_attention(q, k, v, bias, mask, scale)
    # The formula, written out: window w of image b uses shift-mask row w % nW.
    scores = q @ k.transpose(-2, -1) * scale + bias
    if mask is not None:
        scores = scores + mask.repeat(2, 1, 1).unsqueeze(1)
    expected = scores.softmax(-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v, bias), grad_out)
    for name, got, want in zip("qkvb", grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=name)


def test_chunked_window_attention_passes_gradcheck():
    from swinssl.nn.cpu_attention import window_attention

    (q, k, v, bias), mask = _attention_inputs(windows=4, heads=2, n=4, d=3, per_image=2, seed=1)
    assert torch.autograd.gradcheck(lambda *t: window_attention(*t, mask, 0.5), (q, k, v, bias))


def test_shift_masks_are_kept_in_training_and_not_in_inference():
    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(2, 2, 2, 2))
    stages = [m for m in model.modules() if isinstance(m, swin_module.BasicLayer)]
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        expected = model(x)
    assert all(not stage._masks for stage in stages)  # inference: built per forward, freed with it
    got = model(x)  # with gradients: stages whose windows shift keep their mask for the next forward
    assert [len(stage._masks) for stage in stages] == [1, 1, 1, 0]  # 4^3 tokens fit one window: no shift
    assert torch.equal(got, expected)


def test_activation_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    plain = SwinUNETR(feature_size=12, out_channels=2)
    ckpt = SwinUNETR(feature_size=12, out_channels=2, use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(1, 1, 64, 32, 32)
    plain(x).square().mean().backward()
    ckpt(x).square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, param in ckpt.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_feature_sizes_and_bottleneck_width():
    for size, feature in (("tiny", 12), ("small", 24), ("base", 48), ("large", 96)):
        net = swin_unetr(size, out_channels=2)
        assert net.encoder10.layer.conv1.conv.weight.shape[:2] == (16 * feature, 16 * feature)


def test_full_size_shapes_on_meta_device():
    # Full-size configs are for GPUs: check their shapes without allocating.
    with torch.device("meta"):
        net = SwinUNETR(in_channels=1, out_channels=14, feature_size=48)
        hidden = net.swinViT(torch.empty(2, 1, 96, 96, 96))
        assert [tuple(h.shape) for h in hidden] == [
            (2, 48, 48, 48, 48), (2, 96, 24, 24, 24), (2, 192, 12, 12, 12), (2, 384, 6, 6, 6), (2, 768, 3, 3, 3)
        ]


def test_bad_configs_and_inputs_raise_clearly():
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        SwinUNETR(feature_size=12, num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="downsample must be one of merging, mergingv2"):
        SwinUNETR(feature_size=12, downsample="pool")
    with pytest.raises(ValueError, match="size must be one of tiny, small, base, large"):
        swin_unetr("huge")
    net = swin_unetr("tiny", in_channels=2, out_channels=2)
    with pytest.raises(ValueError, match="expected 2 input channels, got 1"):
        net(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match=r"expected input \(B, C, D, H, W\)"):
        net(torch.randn(2, 32, 32, 32))
