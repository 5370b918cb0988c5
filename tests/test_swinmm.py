"""SwinMM: multi-view views and losses, the cross-view block, multi-view fine-tuning, fused
prediction and semi-supervised training (tiny models, CPU)."""

import math

import pytest
import torch

from swinssl.config import Config, MethodConfig, ModelConfig, load_config
from swinssl.methods import swinmm
from swinssl.nn import SwinUNETR, build_network, load_pretrained
from swinssl.nn.multiview import CrossViewAttention, MultiViewSwinUNETR, fused_log_probs
from swinssl.ssl.losses import cosine_consistency, masked_mse, mutual_loss, symmetric_kl, zscore
from swinssl.ssl.views import PERMUTATIONS, multi_views, patch_mask, permute, rotate_by, to_common_frame, unpermute

TINY_NET = dict(in_channels=1, out_channels=3, feature_size=12, depths=(1, 1, 1, 1))


# --- views ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PERMUTATIONS))
def test_permutation_then_inverse_is_identity(name):
    order = PERMUTATIONS[name]
    x = torch.randn(2, 3, 5, 6, 7)  # every axis a different length: a wrong inverse cannot match
    view = permute(x, order)
    assert view.shape == (2, 3, *(x.shape[2 + a] for a in order))
    assert torch.equal(unpermute(view, order), x)
    assert torch.equal(permute(unpermute(x, order), order), x)
    if name != "identity":
        assert view.shape != x.shape


def test_swaps_move_the_named_axes():
    x = torch.arange(2 * 3 * 4).float().view(1, 1, 2, 3, 4)
    assert torch.equal(permute(x, PERMUTATIONS["swap_xy"])[0, 0], x[0, 0].transpose(0, 1))
    assert torch.equal(permute(x, PERMUTATIONS["swap_xz"])[0, 0], x[0, 0].transpose(0, 2))


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_patch_mask_masks_exactly_the_ratio_in_whole_cubes(ratio):
    mask = patch_mask(3, (64, 64, 32), torch.Generator().manual_seed(0), ratio=ratio, patch=16)
    assert mask.shape == (3, 1, 64, 64, 32) and mask.dtype == torch.bool
    cubes = mask.view(3, 4, 16, 4, 16, 2, 16).float().mean((2, 4, 6))  # per-cube masked share
    assert set(cubes.unique().tolist()) <= {0.0, 1.0}  # whole cubes only
    for sample in mask:
        assert sample.float().mean().item() == ratio  # exactly: 32 cubes, ratio * 32 of them
    assert not torch.equal(mask[0], mask[1])  # drawn per sample


def test_patch_mask_is_reproducible_and_checks_its_input():
    a = patch_mask(2, (32, 32, 32), torch.Generator().manual_seed(5))
    b = patch_mask(2, (32, 32, 32), torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="multiples of 16"):
        patch_mask(1, (40, 32, 32), torch.Generator())
    with pytest.raises(ValueError, match="ratio"):
        patch_mask(1, (32, 32, 32), torch.Generator(), ratio=1.5)


def test_multi_views_share_one_mask_and_map_back_exactly():
    x = torch.rand(3, 1, 32, 32, 32)
    views = multi_views(x, torch.Generator().manual_seed(1), ratio=0.5, patch=16)
    assert views["orders"][0] == PERMUTATIONS["identity"] and views["orders"][1] != PERMUTATIONS["identity"]
    for view, target, mask, order, k in zip(views["views"], views["targets"], views["masks"], views["orders"],
                                            views["rotations"]):
        assert torch.equal(to_common_frame(target, order, k), x)
        assert torch.equal(to_common_frame(mask, order, k), views["mask"])  # the same cubes in every view
        assert (view[mask] == 0).all() and torch.equal(view[~mask], target[~mask])
    assert views["mask"].float().mean().item() == 0.5


def test_rotate_by_inverse_undoes_the_turns():
    x = torch.randn(4, 1, 6, 5, 5)
    k = torch.tensor([0, 1, 2, 3])
    turned = rotate_by(x, k)
    assert torch.equal(turned[1], torch.rot90(x[1], 1, dims=(-2, -1)))
    assert torch.equal(rotate_by(turned, k, inverse=True), x)


# --- losses --------------------------------------------------------------------------------------


def test_masked_mse_hand_case():
    rec = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 1, 4)
    target = torch.tensor([0.0, 0.0, 0.0, 10.0]).view(1, 1, 1, 1, 4)
    mask = torch.tensor([True, False, True, False]).view(1, 1, 1, 1, 4)
    assert masked_mse(rec, target, mask).item() == pytest.approx((1 + 9) / 2)
    assert masked_mse(rec, target, torch.zeros_like(mask)).item() == 0.0


def test_zscore_per_sample():
    x = torch.rand(2, 1, 4, 4, 4) * torch.tensor([1.0, 50.0]).view(2, 1, 1, 1, 1)
    z = zscore(x)
    torch.testing.assert_close(z.mean((1, 2, 3, 4)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std((1, 2, 3, 4)), torch.ones(2), atol=1e-4, rtol=0)


def test_mutual_loss_is_zero_for_consistent_reconstructions_and_positive_otherwise():
    x = torch.rand(2, 1, 32, 32, 32)
    views = multi_views(x, torch.Generator().manual_seed(3))
    # Reconstructions that agree after mapping back: the views of one volume.
    agreeing = [to_common_frame(t, o, k) for t, o, k in zip(views["targets"], views["orders"], views["rotations"])]
    assert mutual_loss(agreeing, views["mask"]).item() == 0.0
    # Mapped back wrongly (not undone): they disagree.
    assert mutual_loss(list(views["targets"]), views["mask"]).item() > 1e-3
    # Disagreement only on visible voxels does not count; on hidden ones it does.
    other = agreeing[0].clone()
    other[~views["mask"].expand_as(other)] += 1.0
    assert mutual_loss([agreeing[0], other], views["mask"]).item() == 0.0
    other = agreeing[0] + 0.5 * views["mask"]
    assert mutual_loss([agreeing[0], other], views["mask"]).item() == pytest.approx(0.25)


def test_mutual_loss_pulls_the_permuted_view_towards_the_held_unpermuted_one():
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[..., :2] = True  # 32 hidden voxels
    reference = torch.zeros(1, 1, 4, 4, 4, requires_grad=True)
    permuted = torch.ones(1, 1, 4, 4, 4, requires_grad=True)
    loss = mutual_loss([reference, permuted], mask)
    assert loss.item() == pytest.approx(1.0)  # mean of (1 - 0)^2 over the hidden voxels
    loss.backward()
    assert reference.grad is None or not reference.grad.any()  # the un-permuted view is the reference
    expected = torch.where(mask, 2.0 / 32, 0.0)  # d/dr mean((r - 0)^2) over 32 voxels
    torch.testing.assert_close(permuted.grad, expected)


def test_symmetric_kl_hand_case():
    # One voxel, two classes: p = (0.8, 0.2), q = (0.4, 0.6).
    p, q = torch.tensor([0.8, 0.2]), torch.tensor([0.4, 0.6])
    kl_pq = 0.8 * math.log(0.8 / 0.4) + 0.2 * math.log(0.2 / 0.6)
    kl_qp = 0.4 * math.log(0.4 / 0.8) + 0.6 * math.log(0.6 / 0.2)
    a, b = p.log().view(1, 2, 1, 1, 1), q.log().view(1, 2, 1, 1, 1)  # log-probabilities are valid logits
    assert symmetric_kl(a, b).item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-5)
    # Averaged over voxels: a second, agreeing voxel halves it.
    a2, b2 = torch.cat([a, a], 2), torch.cat([b, a], 2)
    assert symmetric_kl(a2, b2).item() == pytest.approx((kl_pq + kl_qp) / 4, rel=1e-5)
    assert symmetric_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)


def test_cosine_consistency_hand_case():
    # One voxel, two classes: p = (0.8, 0.2), q = (0.4, 0.6); cos = <p, q> / (|p| |q|).
    cos = (0.8 * 0.4 + 0.2 * 0.6) / (math.hypot(0.8, 0.2) * math.hypot(0.4, 0.6))
    a, b = torch.tensor([0.8, 0.2]).log().view(1, 2, 1, 1, 1), torch.tensor([0.4, 0.6]).log().view(1, 2, 1, 1, 1)
    assert cosine_consistency(a, b).item() == pytest.approx(1 - cos, rel=1e-5)
    # Averaged over voxels: a second, agreeing voxel halves it.
    assert cosine_consistency(torch.cat([a, a], 2), torch.cat([b, a], 2)).item() == pytest.approx((1 - cos) / 2, rel=1e-5)
    assert cosine_consistency(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # All mass on different classes: orthogonal probability vectors, the maximum 1.
    sure = torch.tensor([30.0, -30.0]).view(1, 2, 1, 1, 1)
    assert cosine_consistency(sure, -sure).item() == pytest.approx(1.0, abs=1e-6)


def test_cosine_consistency_matches_a_loop_over_voxels():
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 2, 3, 4, requires_grad=True), torch.randn(2, 3, 2, 3, 4, requires_grad=True)
    pa, pb = torch.softmax(a, 1).detach(), torch.softmax(b, 1).detach()
    terms = []
    for n in range(2):
        for i in range(2):
            for j in range(3):
                for k in range(4):
                    u, v = pa[n, :, i, j, k].tolist(), pb[n, :, i, j, k].tolist()
                    dot = sum(x * y for x, y in zip(u, v))
                    terms.append(1 - dot / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v))))
    loss = cosine_consistency(a, b)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert cosine_consistency(b, a).item() == pytest.approx(loss.item(), rel=1e-6)  # symmetric
    loss.backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0  # both views get gradients
    with pytest.raises(ValueError, match="differ in shape"):
        cosine_consistency(a, b[:1])


def test_swinmm_pretraining_losses_and_gradients():
    torch.manual_seed(0)
    method = MethodConfig(name="swinmm", weights={"inpaint": 1.0, "rotate": 1.0, "contrast": 1.0, "mutual": 1.0})
    model = swinmm.METHOD.build_model(Config(model=ModelConfig(feature_size=12, depths=(1, 1, 1, 1)), method=method))
    total, parts, previews = swinmm.METHOD.compute_losses(model, torch.rand(2, 1, 64, 64, 64), torch.Generator().manual_seed(0),
                                                   method)
    assert {"inpaint", "rotate", "contrast", "mutual"} <= set(parts)
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    total.backward()
    assert model.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0
    assert previews["reconstruction"].shape == (1, 64, 64, 64)


# --- the cross-view block and the multi-view network ---------------------------------------------


@pytest.mark.parametrize("residual", [False, True])
def test_cross_view_block_lets_view_a_see_view_b(residual):
    torch.manual_seed(0)
    block = CrossViewAttention(32, 4, residual=residual)
    a, b = torch.randn(2, 32, 2, 2, 2), torch.randn(2, 32, 2, 2, 2)
    out_a, _ = block(a, b)
    changed_a, _ = block(a, b + torch.randn_like(b))
    assert out_a.shape == a.shape
    assert (changed_a - out_a).abs().max() > 1e-3  # only B changed, A's output moved
    # A sample's output depends on its own pair only, not on the rest of the batch.
    solo_a, _ = block(a[:1], b[:1])
    torch.testing.assert_close(solo_a, out_a[:1], atol=1e-5, rtol=0)


def test_multiview_network_output_of_view_a_depends_on_view_b():
    torch.manual_seed(0)
    net = MultiViewSwinUNETR(**TINY_NET).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    identity, swap = PERMUTATIONS["identity"], PERMUTATIONS["swap_xy"]
    with torch.no_grad():
        a1, b1 = net(x, orders=(identity, swap))
        assert a1.shape == b1.shape == (1, 3, 32, 32, 32)
        # The same identity view paired with a different second view: its output changes.
        a2, _ = net(x, orders=(identity, PERMUTATIONS["swap_xz"]))
        assert (a2 - a1).abs().max() > 1e-4
        fused = net(x)
    torch.testing.assert_close(fused.exp().sum(1), torch.ones(1, 32, 32, 32), atol=1e-5, rtol=0)


@pytest.mark.parametrize("site, width", [("bottleneck", 16), ("intermediate", 8)])
def test_cross_attention_site_is_where_the_views_meet(site, width):
    """The block attends over the bottleneck (16 x feature size channels, after encoder10) or over the
    skip decoder5 joins (the stage-4 Swin output, 8 x feature size), and nowhere else."""
    torch.manual_seed(0)
    net = build_network({**TINY_NET, "multiview": True, "cross_attention_at": site}).eval()
    assert net.cross_attention_at == site
    seen = []
    net.cross_attention.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    with torch.no_grad():
        net(torch.rand(1, 1, 64, 64, 64), orders=(PERMUTATIONS["identity"], PERMUTATIONS["swap_xy"]))
    # 64^3: the bottleneck is 2^3 tokens of 16C, the stage-4 output 4^3 tokens of 8C.
    assert seen == [torch.Size((1, width * 12, *(64 // (2 * width),) * 3))]


def test_views_meet_only_in_the_losses_without_cross_attention():
    torch.manual_seed(0)
    net = build_network({**TINY_NET, "multiview": True, "cross_attention_at": "none"}).eval()
    assert net.cross_attention is None and not any(k.startswith("cross_attention.") for k in net.state_dict())
    x = torch.rand(1, 1, 32, 32, 32)
    identity = PERMUTATIONS["identity"]
    with torch.no_grad():
        a1, _ = net(x, orders=(identity, PERMUTATIONS["swap_xy"]))
        a2, _ = net(x, orders=(identity, PERMUTATIONS["swap_xz"]))
    torch.testing.assert_close(a1, a2)  # view A's output does not depend on its partner


def test_default_multiview_state_dict_is_swinunetr_plus_the_bottleneck_block():
    """Existing multi-view checkpoints load unchanged: the default network's keys and shapes."""
    multi, single = MultiViewSwinUNETR(**TINY_NET).state_dict(), SwinUNETR(**TINY_NET).state_dict()
    extra = {k: tuple(v.shape) for k, v in multi.items() if k not in single}
    width = 16 * TINY_NET["feature_size"]
    assert extra == {"cross_attention.norm.weight": (width,), "cross_attention.norm.bias": (width,),
                     "cross_attention.attn.in_proj_weight": (3 * width, width),
                     "cross_attention.attn.in_proj_bias": (3 * width,),
                     "cross_attention.attn.out_proj.weight": (width, width),
                     "cross_attention.attn.out_proj.bias": (width,)}
    assert all(multi[k].shape == v.shape for k, v in single.items())


def test_cross_attention_site_travels_in_the_plan_and_rebuilds_the_network():
    from swinssl.config import PreprocessConfig
    from swinssl.plan import Plan

    model = ModelConfig(feature_size=12, depths=(1, 1, 1, 1), multiview=True, cross_attention_at="intermediate")
    net = build_network(model, out_channels=3)
    raw = Plan(network=model, preprocess=PreprocessConfig(), out_channels=3).to_dict()
    assert raw["network"]["cross_attention_at"] == "intermediate"
    rebuilt = build_network(Plan.from_dict(raw).network_fields())
    assert rebuilt.cross_attention_at == "intermediate"
    rebuilt.load_state_dict(net.state_dict())  # strict: the same block at the same place
    # A plan written before the option existed means the bottleneck.
    del raw["network"]["cross_attention_at"]
    assert build_network(Plan.from_dict(raw).network_fields()).cross_attention_at == "bottleneck"
    with pytest.raises(ValueError, match="cross_attention_at"):
        MultiViewSwinUNETR(**TINY_NET, cross_attention_at="decoder")


def test_swinunetr_weights_load_into_the_multiview_network_and_back():
    single = SwinUNETR(**TINY_NET)
    multi = build_network({**TINY_NET, "multiview": True})
    assert isinstance(multi, MultiViewSwinUNETR)
    missing, unexpected = multi.load_state_dict(single.state_dict(), strict=False)
    assert missing and all(k.startswith("cross_attention.") for k in missing) and not unexpected
    report = load_pretrained(SwinUNETR(**TINY_NET), multi.state_dict())
    assert report.loaded and all(k.startswith("cross_attention.") for k in report.unexpected)


def test_swinmm_pretrained_encoder_loads_into_a_single_view_swinunetr():
    ssl = swinmm.METHOD.build_model(Config(model=ModelConfig(feature_size=12, depths=(1, 1, 1, 1)),
                                           method=MethodConfig(name="swinmm")))
    net = SwinUNETR(**TINY_NET)
    report = load_pretrained(net, {"state_dict": ssl.state_dict()})
    assert set(report.loaded) == {k for k in ssl.state_dict() if k.startswith("swinViT.")}
    torch.testing.assert_close(net.swinViT.patch_embed.proj.weight, ssl.swinViT.patch_embed.proj.weight)


def test_window_predictor_fuses_the_multiview_pairs_or_takes_the_identity_view():
    torch.manual_seed(0)
    net = MultiViewSwinUNETR(**TINY_NET).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        single = swinmm.METHOD.window_predictor(net, "single")(x)
        torch.testing.assert_close(single, net(x, orders=(PERMUTATIONS["identity"], PERMUTATIONS["swap_xy"]))[0])
        orders = list(PERMUTATIONS.values())
        outs = [o for i in range(3) for o in net(x, orders=(orders[i], orders[(i + 1) % 3]))]
        torch.testing.assert_close(swinmm.METHOD.window_predictor(net, "fused")(x), fused_log_probs(outs))


@pytest.mark.parametrize("consistency, term", [("kl", symmetric_kl), ("cosine", cosine_consistency)])
def test_multiview_finetuning_objective_weighs_every_term_as_documented(consistency, term):
    """total = mean DiceCE of the two views + c * consistency, plus u * (the same on unlabelled crops against
    the detached argmax of the views' mean softmax), for the view pair the step's seed draws; the
    consistency term is the one ``finetune.consistency`` names."""
    from monai.losses import DiceCELoss

    from swinssl.config import FinetuneConfig

    torch.manual_seed(0)
    net = MultiViewSwinUNETR(**TINY_NET)
    x, xu = torch.rand(2, 1, 32, 32, 32), torch.rand(2, 1, 32, 32, 32)
    y = torch.randint(0, 3, (2, 1, 32, 32, 32))
    seg = DiceCELoss(to_onehot_y=True, softmax=True)
    cfg = Config(finetune=FinetuneConfig(consistency=consistency, consistency_weight=0.3, unlabeled_weight=0.7))
    total, parts = swinmm.METHOD.finetune_losses(net, x, y, xu, seed=5, cfg=cfg, segmentation_loss=seg)

    orders = swinmm.draw_view_pair(5)
    assert orders[0] != orders[1]
    a, b = net(x, orders=orders)
    ua, ub = net(xu, orders=orders)
    pseudo = (torch.softmax(ua, 1) + torch.softmax(ub, 1)).argmax(1, keepdim=True)
    expected = {"dice_ce": (seg(a, y) + seg(b, y)) / 2, "consistency": term(a, b),
                "unlabeled_dice_ce": (seg(ua, pseudo) + seg(ub, pseudo)) / 2, "unlabeled_consistency": term(ua, ub)}
    for name, value in expected.items():
        torch.testing.assert_close(parts[name], value, msg=name)
    torch.testing.assert_close(total, expected["dice_ce"] + 0.3 * expected["consistency"]
                               + 0.7 * (expected["unlabeled_dice_ce"] + 0.3 * expected["unlabeled_consistency"]))
    # The pseudo-labels carry no gradient: only the unlabelled outputs' own terms reach the network.
    assert not pseudo.requires_grad


# --- end to end on phantoms ----------------------------------------------------------------------

FINETUNE_TINY = [
    "model.depths=[1,1,1,1]", "preprocess.roi_size=32", "preprocess.num_crops=1", "train.num_workers=0",
    "train.log_every=1", "train.val_every=2", "train.checkpoint_every=2", "train.warmup_steps=1", "finetune.overlap=0",
]



def test_swinmm_pretraining_runs_logs_every_task_and_feeds_multiview_finetuning(tmp_path, small_phantoms):
    from swinssl.engine.finetune import finetune
    from swinssl.runs import read_metrics
    from swinssl.engine.pretrain import pretrain

    pre = pretrain(load_config("pretrain/swinmm_tiny", [
        f"data={small_phantoms.parent}", f"train.out={tmp_path}", "train.name=pre", "model.depths=[1,1,1,1]",
        "preprocess.num_crops=1", "preprocess.spacing=null", "train.steps=2", "train.num_workers=0",
        "train.log_every=1", "train.val_every=2", "train.checkpoint_every=2", "train.warmup_steps=1",
    ]), progress=False)
    names = {(r["split"], r["name"]) for r in read_metrics(pre)}
    for task in ("inpaint", "rotate", "contrast", "mutual"):
        assert ("train", task) in names and ("val", task) in names, task
    run = finetune(load_config("finetune/swinmm_tiny", [
        f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=ft", f"finetune.pretrained={pre}",
        "train.steps=2",
        *FINETUNE_TINY,
    ]), progress=False)
    rows = read_metrics(run)
    train = {r["name"] for r in rows if r["split"] == "train"}
    assert {"dice_ce", "consistency"} <= train
    assert any(r["name"] == "dice" and r["split"] == "val" for r in rows)


def test_multiview_finetuning_predicts_fused_by_default_and_single_on_request(tmp_path, small_phantoms):
    import json

    from swinssl.engine.finetune import finetune
    from swinssl.infer import PredictOptions, load_model, predict

    run = finetune(load_config("finetune/swinmm_tiny", [f"data={small_phantoms}", f"train.out={tmp_path}",
                                                         "train.name=mv", "train.steps=2", *FINETUNE_TINY]),
                   progress=False)
    model, plan = load_model(run)
    assert isinstance(model, MultiViewSwinUNETR) and plan.network.multiview is True
    test_image = small_phantoms.parent / "imagesTs" / "phantom_004_ct.nii.gz"
    for views, asked in (("fused", "auto"), ("identity", "identity")):
        out = tmp_path / views
        [mask] = predict(run, test_image, out, PredictOptions(views=asked), progress=False)
        assert mask.is_file()
        assert json.loads((out / "predictions.json").read_text())["options"]["views"] == views


def test_semi_supervised_training_never_reads_unlabelled_labels(tmp_path, small_phantoms, monkeypatch):
    import shutil

    from swinssl.data import splits, transforms
    from swinssl.engine import finetune as engine
    from swinssl.runs import read_metrics

    poisoned = tmp_path / "unlabelled"
    shutil.copytree(small_phantoms.parent, poisoned)
    labels = sorted((poisoned / "labelsTr").iterdir())
    assert labels
    for label in labels:
        label.write_bytes(b"POISON: this label must never be read")
    real_label, real_volume = transforms.read_label, splits.read_volume

    def guard(real):
        def read(path, *args, **kwargs):
            assert str(poisoned) not in str(path), f"read an unlabelled case's label: {path}"
            return real(path, *args, **kwargs)
        return read

    monkeypatch.setattr(transforms, "read_label", guard(real_label))
    monkeypatch.setattr(splits, "read_volume", guard(real_volume))
    run = engine.finetune(load_config("finetune/swinmm_tiny", [
        f"data={small_phantoms}", f"train.out={tmp_path}", "train.name=semi", "train.steps=2",
        f"finetune.unlabeled={poisoned / 'dataset.json'}", *FINETUNE_TINY,
    ]), progress=False)
    train = {r["name"] for r in read_metrics(run) if r["split"] == "train"}
    assert {"unlabeled_dice_ce", "unlabeled_consistency"} <= train
    manifest = (run / "manifest.json").read_text()
    assert "unlabeled" in manifest and "labelsTr" not in manifest.split('"unlabeled"')[1]


def test_unlabelled_data_needs_the_multiview_model(tmp_path, small_phantoms):
    from swinssl.engine.finetune import finetune
    from swinssl.errors import ConfigError

    with pytest.raises(ConfigError, match="multiview"):
        finetune(load_config("finetune/tiny", [f"data={small_phantoms}", f"train.out={tmp_path}", "train.steps=1",
                                               f"finetune.unlabeled={small_phantoms}", *FINETUNE_TINY]), progress=False)


def test_unlabelled_rest_is_the_training_cases_left_out_without_their_labels(tmp_path, small_phantoms):
    """``finetune.unlabeled=rest``: the dataset's training cases that neither train (outside the label
    ratio) nor validate, labels dropped; never a test case. A ratio of 1 leaves none, with a warning."""
    from swinssl.data.discover import find_dataset
    from swinssl.engine.finetune import FinetuneStage

    def stage(ratio):
        return FinetuneStage(load_config("finetune/swinmm_tiny", [
            f"data={small_phantoms}", f"train.out={tmp_path}", f"finetune.label_ratio={ratio}",
            "finetune.unlabeled=rest"]))

    half = stage(0.5)  # 4 training phantoms: 1 validates, 2 of the other 3 train, 1 is left

    def ids(cases):
        return {c.case_id for c in cases}

    training = ids(find_dataset(small_phantoms).split("training", "validation"))
    assert len(half.train_cases) == 2 and len(half.val_cases) == 1
    assert ids(half.unlabeled) == training - ids(half.train_cases) - ids(half.val_cases) and len(half.unlabeled) == 1
    assert all(c.label is None for c in half.unlabeled)
    assert half.splits()["unlabeled"] == half.unlabeled
    with pytest.warns(UserWarning, match="none is left unlabelled"):
        full = stage(1.0)
    assert full.unlabeled == [] and "unlabeled" not in full.splits()
