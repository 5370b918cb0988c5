"""SwinFUSE: the domain-invariance module, the KDE Jensen-Shannon density term, the method and
its checkpoints (tiny models, CPU)."""

import math

import pytest
import torch

from swinssl.config import Config, MethodConfig, ModelConfig, PreprocessConfig
from swinssl.methods import get_method, swinfuse
from swinssl.nn import SwinUNETR, load_pretrained
from swinssl.nn.dim import DomainInvarianceModule
from swinssl.ssl.losses import kde_jsd, nn_bandwidth, sample_tokens

METHOD = MethodConfig(name="swinfuse", weights={"inpaint": 1.0, "rotate": 1.0, "contrast": 1.0, "density": 1.0})
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), domain_invariance=True, dim_heads=3, dim_pool=4)
SWINFUSE = get_method("swinfuse")


def build(model: ModelConfig = TINY, method: MethodConfig = METHOD):
    return SWINFUSE.build_model(Config(model=model, method=method))


# --- density matching ----------------------------------------------------------------------------


def test_bandwidth_is_the_mean_nearest_neighbour_distance():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # nearest: 1, 1, 2
    assert nn_bandwidth(points).item() == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="two points"):
        nn_bandwidth(torch.zeros(1, 3))


def test_jsd_of_identical_sets_is_zero_and_of_separated_sets_log_two():
    torch.manual_seed(0)
    a = torch.randn(64, 8)
    assert kde_jsd(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)
    far = kde_jsd(a, a + 100.0).item()
    assert far == pytest.approx(math.log(2), abs=1e-4)
    # In between for overlapping sets.
    near = kde_jsd(a, torch.randn(64, 8) + 0.5)
    assert 0.01 < near.item() < math.log(2) - 0.01
    # Stable for huge distances (log-sum-exp): finite, not 0/0.
    assert torch.isfinite(kde_jsd(a * 1e4, a * 1e4 + 1e6))


def test_jsd_is_symmetric():
    torch.manual_seed(1)
    a, b = torch.randn(40, 4), torch.randn(50, 4) + 1.0
    torch.testing.assert_close(kde_jsd(a, b), kde_jsd(b, a))


def test_sample_tokens_takes_the_same_positions_from_each_map():
    maps = [torch.randn(2, 5, 3, 3, 3) for _ in range(2)]
    a, b = sample_tokens(maps, 7, torch.Generator().manual_seed(0))
    assert a.shape == b.shape == (7, 5)
    tokens = [m.flatten(2).transpose(1, 2).reshape(-1, 5) for m in maps]
    rows = [next(i for i in range(54) if torch.equal(tokens[0][i], row)) for row in a]
    torch.testing.assert_close(b, tokens[1][rows])


# --- the domain-invariance module ----------------------------------------------------------------


def test_dim_outputs_permute_with_the_batch():
    torch.manual_seed(0)
    dim = DomainInvarianceModule(12, num_heads=3, pool=2).eval()
    a, b = torch.randn(4, 12, 6, 6, 6), torch.randn(4, 12, 6, 6, 6)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(dim(a[order], b[order]), dim(a, b)[order], atol=1e-5, rtol=0)
    ga, gb = dim.gates(a, b)
    ga2, gb2 = dim.gates(a[order], b[order])
    torch.testing.assert_close(ga2, ga[order], atol=1e-5, rtol=0)
    # A stream's gate depends on the other stream of its own pair.
    ga3, _ = dim.gates(a, b + torch.randn_like(b))
    assert (ga3 - ga).abs().max() > 1e-4


def test_dim_single_input_duplicates_it_into_both_streams():
    torch.manual_seed(0)
    dim = DomainInvarianceModule(12, num_heads=3, pool=2)
    a = torch.randn(2, 12, 4, 4, 4)
    gate, _ = dim.gates(a, a)
    torch.testing.assert_close(dim(a), a * gate)


def test_dim_attention_maps_for_figures(tmp_path):
    torch.manual_seed(0)
    model = build()
    view = torch.rand(1, 64, 64, 64)
    path = swinfuse.save_attention_overlay(model.swinViT, view, view.flip(-1), tmp_path / "attention.png")
    assert path.is_file() and path.stat().st_size > 1000
    dim = model.swinViT.dim
    embed = model.swinViT.embed(view[None])
    _, _, on_a, on_b = dim.gates(embed, embed, weights=True)
    assert on_a.shape == on_b.shape == (1, 8, 8, 8)  # 32^3 tokens pooled by 4
    torch.testing.assert_close(on_a.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)  # mean over queries of a softmax


# --- the method ----------------------------------------------------------------------------------


def test_swinfuse_losses_reach_the_dim_and_log_every_term():
    torch.manual_seed(0)
    model = build()
    total, parts, previews = SWINFUSE.compute_losses(model, torch.rand(2, 1, 64, 64, 64),
                                                     torch.Generator().manual_seed(0), METHOD)
    assert {"inpaint", "rotate", "contrast", "density", "jsd"} <= set(parts)
    assert parts["density"].item() == -parts["jsd"].item()
    expected = parts["inpaint"] + parts["rotate"] + parts["contrast"] - parts["jsd"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert model.swinViT.dim.attn.in_proj_weight.grad.abs().sum() > 0
    assert previews["DIM gate (view 1)"].shape == (64, 64, 64)


def test_density_term_alone_moves_the_dim():
    torch.manual_seed(0)
    model = build()
    out = model(torch.rand(4, 1, 64, 64, 64))
    points = sample_tokens(list(out["streams"]), 128, torch.Generator().manual_seed(0))
    kde_jsd(*points).backward()
    assert model.swinViT.dim.attn.in_proj_weight.grad.abs().sum() > 0


def test_swinfuse_needs_the_module():
    from dataclasses import replace

    from swinssl.config import load_config
    from swinssl.errors import ConfigError

    # Without its module, swinfuse is refused even with the density term weighted 0 (it would be Swin UNETR SSL).
    with pytest.raises(ConfigError, match="method swinfuse needs model.domain_invariance=true"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, domain_invariance=False),
                              method=replace(METHOD, weights={**METHOD.weights, "density": 0.0})))
    with pytest.raises(ConfigError, match="domain_invariance"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, domain_invariance=False), method=METHOD))
    # Without its module, swinfuse is refused even with the density term weighted 0 (it would be Swin UNETR SSL).
    with pytest.raises(ConfigError, match="method swinfuse needs model.domain_invariance=true"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, domain_invariance=False),
                              method=replace(METHOD, weights={**METHOD.weights, "density": 0.0})))
    with pytest.raises(ConfigError, match="domain_invariance"):
        SWINFUSE.check(load_config("pretrain/swinfuse_tiny", ["model.domain_invariance=false"]))


def test_pretrained_dim_loads_into_segmentation_network_and_adapts_channels():
    model = build()
    net = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), domain_invariance=True,
                    dim_heads=3)
    report = load_pretrained(net, {"state_dict": model.state_dict()})
    assert {k for k in report.loaded if ".dim." in k}  # the module's weights came along
    torch.testing.assert_close(net.swinViT.dim.attn.in_proj_weight, model.swinViT.dim.attn.in_proj_weight)
    assert net.swinViT.patch_embed.proj.weight.shape[1] == 4  # 1-channel stem adapted to 4 MRI sequences
    with torch.no_grad():
        assert net(torch.rand(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
