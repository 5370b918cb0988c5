"""SwinFUSE: the domain-invariance module, the KDE Jensen-Shannon density term, the method and
its checkpoints (tiny models, CPU)."""

import math

import pytest
import torch

from swinssl.config import Config, MethodConfig, ModelConfig, PreprocessConfig
from swinssl.methods import get_method, swinfuse
from swinssl.nn import SwinUNETR, load_pretrained
from swinssl.nn.dim import DomainInvarianceModule, LightDomainInvarianceModule
from swinssl.ssl.losses import kde_jsd, nn_bandwidth, sample_tokens

METHOD = MethodConfig(name="swinfuse", weights={"inpaint": 1.0, "rotate": 1.0, "contrast": 1.0, "density": 1.0})
# Two co-attention layers of the paper's form keep the method tests fast; the four-layer stack has its own tests.
TINY = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), encoder="domain_invariant_swin", invariance_heads=(3, 6),
                   invariance_pool=4)
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


def make_dim(form: str, pool: int = 2):
    """A module of feature 12; the paper's with its zero-initialised output projections drawn at
    random, so that its gates are not all 1."""
    if form == "light":
        return LightDomainInvarianceModule(12, num_heads=3, pool=pool)
    return draw_outputs(DomainInvarianceModule(12, (3, 6, 12, 24), pool=pool))


def draw_outputs(dim: DomainInvarianceModule) -> DomainInvarianceModule:
    with torch.no_grad():
        for out in (dim.out1, dim.out2):
            out.weight.normal_(0, 0.5)
            out.bias.normal_(0, 0.5)
    return dim


def reference_stream(layers, out, own: torch.Tensor, partner: torch.Tensor, pool: int) -> torch.Tensor:
    """Eq. 1's gate of the stream ``own`` written out head by head: each layer's queries from
    the partner stream's previous state, keys and values from the own stream's, pooled."""
    grid = own.shape[2:]
    o, p = own.flatten(2).transpose(1, 2), partner.flatten(2).transpose(1, 2)
    for layer_own, layer_partner in layers:
        q = layer_own.query(layer_own.norm_query(p))
        own_grid = layer_own.norm_own(o).transpose(1, 2).reshape(o.shape[0], -1, *grid)
        pooled = torch.nn.functional.avg_pool3d(own_grid, pool, ceil_mode=True).flatten(2).transpose(1, 2)
        k, v = layer_own.key_value(pooled).chunk(2, dim=-1)
        width = q.shape[-1] // layer_own.heads
        heads = []
        for h in range(layer_own.heads):
            cols = slice(h * width, (h + 1) * width)
            weights = torch.softmax(q[..., cols] @ k[..., cols].transpose(1, 2) / width**0.5, dim=-1)
            heads.append(weights @ v[..., cols])
        # The partner's next state comes from its own layer, with this stream's state as queries.
        o, p = layer_own.proj(torch.cat(heads, -1)), layer_partner(o, p, grid)
    return 2 * torch.sigmoid(out(o).transpose(1, 2).reshape(own.shape))


def test_paper_dim_is_eq1_each_stream_gated_by_the_partner_queries_over_its_own_keys():
    torch.manual_seed(0)
    dim = make_dim("paper", pool=2)
    a, b = torch.randn(2, 12, 4, 6, 4), torch.randn(2, 12, 4, 6, 4)
    ga, gb = dim.gates(a, b)
    ref_a = reference_stream(list(zip(dim.stream1, dim.stream2)), dim.out1, a, b, pool=2)
    ref_b = reference_stream(list(zip(dim.stream2, dim.stream1)), dim.out2, b, a, pool=2)
    torch.testing.assert_close(ga, ref_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb, ref_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dim(a, b), (a * ga + b * gb) / 2)


def test_paper_dim_layers_heads_and_widths():
    dim = DomainInvarianceModule(48, (3, 6, 12, 24), pool=4)
    for stream in (dim.stream1, dim.stream2):
        assert [layer.heads for layer in stream] == [3, 6, 12, 24]
        assert [layer.query.out_features for layer in stream] == [48, 96, 192, 384]  # doubling from 48
        assert [layer.query.in_features for layer in stream] == [48, 48, 96, 192]
    assert dim.out1.in_features == 384 and dim.out1.out_features == 48
    with pytest.raises(ValueError, match="layer 2's 24 channels do not split into 5 heads"):
        DomainInvarianceModule(12, (3, 5))


def test_untrained_paper_dim_is_the_identity():
    torch.manual_seed(0)
    dim = DomainInvarianceModule(12, (3, 6), pool=2)
    a, b = torch.randn(1, 12, 4, 4, 4), torch.randn(1, 12, 4, 4, 4)
    ga, gb = dim.gates(a, b)
    assert torch.equal(ga, torch.ones_like(a)) and torch.equal(gb, torch.ones_like(b))
    torch.testing.assert_close(dim(a), a)


def test_invariance_heads_chooses_the_form_and_old_checkpoints_keep_the_light_one():
    from swinssl.config import load_config, to_dict
    from swinssl.nn.build import build_network
    from swinssl.plan import Plan

    cfg = load_config("pretrain/swinfuse_tiny")
    paper = build_network(cfg.model, out_channels=2)
    light = build_network(load_config("pretrain/swinfuse_tiny", ["model.invariance_heads=3"]).model, out_channels=2)
    assert isinstance(paper.swinViT.invariance, DomainInvarianceModule) and len(paper.swinViT.invariance.stream1) == 4
    assert isinstance(light.swinViT.invariance, LightDomainInvarianceModule)
    # A plan written before the paper's form existed holds an integer: it rebuilds the light module. Plans
    # written before the encoder was a variant of its own say domain_invariance / dim_heads: read the same.
    network = {k: v for k, v in to_dict(cfg.model).items() if k not in ("encoder", "invariance_heads")}
    plan = Plan.from_dict({"network": {**network, "domain_invariance": True, "dim_heads": 4}, "preprocess": {}})
    assert plan.network.encoder == "domain_invariant_swin" and plan.network.invariance_heads == 4
    assert isinstance(build_network(plan.network, out_channels=2).swinViT.invariance, LightDomainInvarianceModule)
    assert Plan.from_dict({"network": {**network, "domain_invariance": False}, "preprocess": {}}).network.encoder == "swin"


@pytest.mark.parametrize("form", ["paper", "light"])
def test_dim_outputs_permute_with_the_batch(form):
    torch.manual_seed(0)
    dim = make_dim(form, pool=2).eval()
    a, b = torch.randn(4, 12, 6, 6, 6), torch.randn(4, 12, 6, 6, 6)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(dim(a[order], b[order]), dim(a, b)[order], atol=1e-5, rtol=0)
    ga, gb = dim.gates(a, b)
    ga2, gb2 = dim.gates(a[order], b[order])
    torch.testing.assert_close(ga2, ga[order], atol=1e-5, rtol=0)
    # A stream's gate depends on the other stream of its own pair.
    ga3, _ = dim.gates(a, b + torch.randn_like(b))
    assert (ga3 - ga).abs().max() > 1e-4


@pytest.mark.parametrize("form", ["paper", "light"])
def test_dim_single_input_duplicates_it_into_both_streams(form):
    torch.manual_seed(0)
    dim = make_dim(form, pool=2)
    a = torch.randn(2, 12, 4, 4, 4)
    ga, gb = dim.gates(a, a)
    torch.testing.assert_close(dim(a), a * (ga + gb) / 2)


def test_dim_attention_maps_for_figures(tmp_path):
    torch.manual_seed(0)
    model = build()
    view = torch.rand(1, 64, 64, 64)
    path = swinfuse.save_attention_overlay(model.swinViT, view, view.flip(-1), tmp_path / "attention.png")
    assert path.is_file() and path.stat().st_size > 1000
    dim = model.swinViT.invariance
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
    assert model.swinViT.invariance.out1.weight.grad.abs().sum() > 0  # zero-initialised: only the output moves at first
    assert previews["DIM gate (view 1)"].shape == (64, 64, 64)


def test_density_term_alone_moves_the_dim():
    torch.manual_seed(0)
    model = build()
    out = model(torch.rand(4, 1, 64, 64, 64))
    points = sample_tokens(list(out["streams"]), 128, torch.Generator().manual_seed(0))
    kde_jsd(*points).backward()
    assert model.swinViT.invariance.out2.weight.grad.abs().sum() > 0


def test_swinfuse_needs_the_module():
    from dataclasses import replace

    from swinssl.config import load_config
    from swinssl.errors import ConfigError

    # Without its module, swinfuse is refused even with the density term weighted 0 (it would be Swin UNETR SSL).
    with pytest.raises(ConfigError, match="method swinfuse needs model.encoder=domain_invariant_swin"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, encoder="swin"),
                              method=replace(METHOD, weights={**METHOD.weights, "density": 0.0})))
    with pytest.raises(ConfigError, match="model.encoder"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, encoder="swin"), method=METHOD))
    # Without its module, swinfuse is refused even with the density term weighted 0 (it would be Swin UNETR SSL).
    with pytest.raises(ConfigError, match="method swinfuse needs model.encoder=domain_invariant_swin"):
        SWINFUSE.check(Config(preprocess=PreprocessConfig(roi_size=(64, 64, 64)),
                              model=replace(TINY, encoder="swin"),
                              method=replace(METHOD, weights={**METHOD.weights, "density": 0.0})))
    with pytest.raises(ConfigError, match="model.encoder=domain_invariant_swin"):
        SWINFUSE.check(load_config("pretrain/swinfuse_tiny", ["model.encoder=swin"]))
    # the key configs wrote before the encoder was a variant of its own still reads
    assert load_config("pretrain/swinfuse_tiny", ["model.domain_invariance=false"]).model.encoder == "swin"


def test_pretrained_dim_loads_into_segmentation_network_and_adapts_channels():
    model = build()
    net = SwinUNETR(in_channels=4, out_channels=3, feature_size=12, depths=(1, 1, 1, 1), encoder="domain_invariant_swin",
                    invariance_heads=(3, 6))
    report = load_pretrained(net, {"state_dict": model.state_dict()})
    assert {k for k in report.loaded if ".invariance." in k}  # the module's weights came along
    torch.testing.assert_close(net.swinViT.invariance.stream2[1].key_value.weight,
                               model.swinViT.invariance.stream2[1].key_value.weight)
    # a swinssl checkpoint written when the module was the encoder's ``dim``: its keys load as before
    older = {k.replace(".invariance.", ".dim."): v for k, v in model.state_dict().items()}
    report = load_pretrained(net, {"format": "swinssl", "model": older})
    assert {k for k in report.loaded if ".invariance." in k} and not any(".dim." in k for k in report.unexpected)
    assert net.swinViT.patch_embed.proj.weight.shape[1] == 4  # 1-channel stem adapted to 4 MRI sequences
    with torch.no_grad():
        assert net(torch.rand(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


# --- fine-tuning: two views of each crop (sec. 2.4) -------------------------------------------------


def test_segmentation_network_takes_a_second_stream_through_the_module():
    torch.manual_seed(0)
    net = SwinUNETR(out_channels=3, feature_size=12, depths=(1, 1, 1, 1), encoder="domain_invariant_swin",
                    invariance_heads=(3, 6))
    draw_outputs(net.swinViT.invariance)  # so that the gates depend on the streams
    x, other = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x, second=x), net(x))  # one input is both streams
        assert (net(x, second=other) - net(x)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="second stream needs the domain-invariant encoder"):
        SwinUNETR(out_channels=3, feature_size=12, depths=(1, 1, 1, 1))(x, second=x)


class StreamSpy(torch.nn.Module):
    """Records the streams a fine-tuning step feeds the network; returns two-class logits."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, second=None):
        self.calls.append((x, second))
        return torch.zeros(x.shape[0], 2, *x.shape[2:], requires_grad=True)


def test_swinfuse_fine_tuning_feeds_the_crop_and_a_cut_out_copy():
    from swinssl.config import FinetuneConfig
    from swinssl.methods import finetune_method

    assert finetune_method("auto", {"encoder": "domain_invariant_swin", "multiview": False}) is SWINFUSE
    assert finetune_method("auto", {"encoder": "domain_invariant_swin", "multiview": True}) is not SWINFUSE
    assert finetune_method("auto", {"encoder": "swin", "multiview": False}) is not SWINFUSE
    x, y = torch.rand(2, 1, 16, 16, 16), torch.zeros(2, 1, 16, 16, 16, dtype=torch.long)
    seg = lambda logits, target: logits.sum() * 0  # noqa: E731
    spy = StreamSpy()
    SWINFUSE.finetune_losses(spy, x, y, None, 7, Config(finetune=FinetuneConfig(dim_cutout=0.3)), seg)
    first, second = spy.calls[-1]
    assert first is x
    changed = (second != x).float().mean().item()
    assert 0 < changed < 0.6  # some boxes, never the whole crop
    SWINFUSE.finetune_losses(spy, x, y, None, 7, Config(finetune=FinetuneConfig(dim_cutout=0.0)), seg)
    assert spy.calls[-1][1] is None  # 0: the crop in both streams, as inference
    from swinssl.errors import ConfigError

    with pytest.raises(ConfigError, match="finetune.dim_cutout must be in"):
        SWINFUSE.check_finetune(Config(finetune=FinetuneConfig(dim_cutout=1.0)))


def test_light_module_gates_each_stream_by_its_queries_over_the_other_streams_keys():
    """A loop reference of the light module: stream a's gate is 2 sigmoid of a's (normed) tokens
    attending over b's pooled, normed tokens, and the reverse; the output averages the gated streams."""
    torch.manual_seed(3)
    dim = LightDomainInvarianceModule(12, num_heads=3, pool=2)
    a, b = torch.randn(2, 12, 4, 4, 4), torch.randn(2, 12, 4, 4, 4) * 2 + 1
    with torch.no_grad():
        ga, gb = dim.gates(a, b)
        expected = []
        for query, keys in ((a, b), (b, a)):
            q = dim.norm(query.flatten(2).transpose(1, 2))
            k = dim.norm(torch.nn.functional.avg_pool3d(keys, 2, ceil_mode=True).flatten(2).transpose(1, 2))
            out, _ = dim.attn(q, k, k)
            expected.append(2 * torch.sigmoid(out.transpose(1, 2).reshape(query.shape)))
        torch.testing.assert_close(ga, expected[0])
        torch.testing.assert_close(gb, expected[1])
        torch.testing.assert_close(dim(a, b), (a * expected[0] + b * expected[1]) / 2)


def test_an_unknown_encoder_variant_is_refused_by_name():
    from swinssl.config import load_config
    from swinssl.errors import ConfigError

    with pytest.raises(ValueError, match="encoder must be one of swin, domain_invariant_swin, got 'swinv3'"):
        SwinUNETR(out_channels=2, feature_size=12, encoder="swinv3")
    with pytest.raises(ConfigError, match="model.encoder must be one of swin, domain_invariant_swin"):
        load_config("finetune/tiny", ["model.encoder=swinv3"])
