"""load_pretrained: one test per checkpoint layout, channel adaptation, and the refusals."""

import pytest
import torch
from monai.networks.nets import SwinUNETR as MonaiSwinUNETR

from swinssl.errors import CheckpointError
from swinssl.nn import SwinUNETR, load_pretrained


@pytest.fixture(scope="module")
def monai_net():
    torch.manual_seed(0)
    return MonaiSwinUNETR(in_channels=1, out_channels=3, feature_size=12).eval()


def encoder_only(state):
    return {k[len("swinViT."):]: v for k, v in state.items() if k.startswith("swinViT.")}


def official_ssl_layout(state):
    """model_swinvit.pt: encoder keys under module., MLP named fc1/fc2, and a final norm."""
    out = {}
    for key, value in encoder_only(state).items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        out["module." + key] = value
    out["module.norm.weight"] = torch.ones(192)
    out["module.norm.bias"] = torch.zeros(192)
    return {"epoch": 100, "state_dict": out}


def assert_encoder_equal(model, reference, shape=(1, 1, 64, 64, 32)):
    x = torch.randn(shape)
    with torch.no_grad():
        for a, b in zip(model.eval().swinViT(x), reference.swinViT(x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_monai_state_dict_loads_everything(tmp_path, monai_net):
    path = tmp_path / "monai.pt"
    torch.save(monai_net.state_dict(), path)
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    report = load_pretrained(model, path)
    assert report.layout == "monai"
    assert len(report.loaded) == len(monai_net.state_dict()) == 159
    assert not (report.missing or report.unexpected or report.mismatched)
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), monai_net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_ddp_and_compile_prefixes_are_removed(tmp_path, monai_net, prefix):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {prefix + k: v for k, v in monai_net.state_dict().items()}}, path)
    report = load_pretrained(SwinUNETR(in_channels=1, out_channels=3, feature_size=12), path)
    assert len(report.loaded) == 159 and not report.unexpected


def test_official_ssl_release_layout(tmp_path, monai_net):
    path = tmp_path / "model_swinvit.pt"
    torch.save(official_ssl_layout(monai_net.state_dict()), path)
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    report = load_pretrained(model, path)
    assert report.layout == "ssl-official"
    assert len(report.loaded) == len(encoder_only(monai_net.state_dict()))  # every encoder tensor
    assert sorted(report.ignored) == ["module.norm.bias", "module.norm.weight"]
    assert all(not k.startswith("swinViT.") for k in report.missing)  # only the decoder is missing
    assert_encoder_equal(model, monai_net)


def test_official_layout_with_swin_vit_prefix(monai_net):
    state = {"swin_vit." + k: v for k, v in encoder_only(monai_net.state_dict()).items()}
    model = SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    report = load_pretrained(model, {"state_dict": state})
    assert report.encoder_loaded > 0 and not report.unexpected
    assert_encoder_equal(model, monai_net)


def test_swinmm_layout_reports_heads_as_unexpected(tmp_path, monai_net):
    state = {"module." + k: v for k, v in monai_net.state_dict().items() if k.startswith("swinViT.")}
    state["module.rotation_head.weight"] = torch.zeros(4, 192)
    state["module.contrastive_head.weight"] = torch.zeros(512, 192)
    path = tmp_path / "swinmm.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12)
    report = load_pretrained(model, path)
    assert report.layout == "swinmm"
    assert sorted(report.unexpected) == ["module.contrastive_head.weight", "module.rotation_head.weight"]
    assert_encoder_equal(model, monai_net)


def test_own_checkpoint_with_plan(tmp_path, monai_net):
    path = tmp_path / "ours.pt"
    plan = {"network": {"feature_size": 12, "downsample": "merging"}}
    torch.save({"format": "swinssl", "model": monai_net.state_dict(), "plan": plan}, path)
    report = load_pretrained(SwinUNETR(in_channels=1, out_channels=3, feature_size=12), path)
    assert report.layout == "swinssl" and len(report.loaded) == 159


def test_own_checkpoint_refuses_other_patch_merging(tmp_path, monai_net):
    path = tmp_path / "ours.pt"
    torch.save({"format": "swinssl", "model": monai_net.state_dict(), "plan": {"network": {"downsample": "merging"}}}, path)
    with pytest.raises(CheckpointError, match="patch merging 'merging' but the model uses 'mergingv2'"):
        load_pretrained(SwinUNETR(out_channels=3, feature_size=12, downsample="mergingv2"), path)
    # A plan that does not say which merging it used (older or hand-made) is not assumed to use the default.
    torch.save({"format": "swinssl", "model": monai_net.state_dict(), "plan": {"network": {"feature_size": 12}}}, path)
    assert load_pretrained(SwinUNETR(out_channels=3, feature_size=12, downsample="mergingv2"), path).loaded


def test_one_channel_weights_adapt_to_four_channels(monai_net):
    model = SwinUNETR(in_channels=4, out_channels=3, feature_size=12)
    report = load_pretrained(model, monai_net.state_dict())
    assert sorted(report.adapted) == ["encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight",
                                      "swinViT.patch_embed.proj.weight"]
    assert not report.mismatched
    # A volume copied into 4 identical channels gives the 1-channel network's output.
    x = torch.randn(1, 1, 64, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x.repeat(1, 4, 1, 1, 1)), monai_net(x), atol=1e-5, rtol=0)


def test_nothing_matching_raises(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"backbone.conv.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(CheckpointError, match=r"other.pt: no encoder weights loaded .*backbone.conv.weight"):
        load_pretrained(SwinUNETR(feature_size=12), path)


def test_other_feature_size_raises_instead_of_loading_bias_tables(monai_net):
    with pytest.raises(CheckpointError, match="the checkpoint has feature size 12, the model 24"):
        load_pretrained(SwinUNETR(feature_size=24), monai_net.state_dict())


@pytest.mark.parametrize("name, refusal", [
    ("evil.pt", "evil.pt: refused to load.*could run code"),
    ("evil.safetensors", "evil.safetensors: cannot read as safetensors"),  # a pickle behind the safe suffix
])
def test_pickled_code_is_refused_and_not_executed(tmp_path, name, refusal):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / name
    torch.save({"state_dict": {"a": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match=refusal):
        load_pretrained(SwinUNETR(feature_size=12), path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path, monai_net):
    path = tmp_path / "cut.pt"
    torch.save(monai_net.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt: cannot read as a PyTorch checkpoint"):
        load_pretrained(SwinUNETR(feature_size=12), path)
    with pytest.raises(CheckpointError, match="absent.pt: checkpoint not found"):
        load_pretrained(SwinUNETR(feature_size=12), tmp_path / "absent.pt")


def test_no_state_dict_inside(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="meta.pt: no state dict found"):
        load_pretrained(SwinUNETR(feature_size=12), path)


def test_exported_safetensors_holds_only_tensors_and_loads_like_the_checkpoint(tmp_path, monai_net):
    import json

    from swinssl.checkpoint import export_weights, save_checkpoint

    plan = {"network": {"feature_size": 12, "in_channels": 1, "out_channels": 3, "downsample": "merging"}}
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", {
        "format": "swinssl", "version": "0", "kind": "finetune", "step": 7, "model": monai_net.state_dict(),
        "optimizer": {"state": {}, "param_groups": []}, "plan": plan})
    exported = export_weights(tmp_path / "run", tmp_path / "weights.safetensors")
    raw = exported.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])  # the format: a JSON table, then raw bytes
    assert json.loads(header["__metadata__"]["plan"]) == plan and header["__metadata__"]["step"] == "7"
    assert {k for k in header if k != "__metadata__"} == set(monai_net.state_dict())
    from_pt, from_st = SwinUNETR(feature_size=12, out_channels=3), SwinUNETR(feature_size=12, out_channels=3)
    report = load_pretrained(from_st, exported)
    load_pretrained(from_pt, ckpt)
    assert not report.missing and not report.mismatched
    for (k, a), b in zip(from_pt.state_dict().items(), from_st.state_dict().values()):
        assert torch.equal(a, b), k


def test_export_refuses_other_names_and_foreign_checkpoints(tmp_path, monai_net):
    from swinssl.checkpoint import export_weights

    torch.save(monai_net.state_dict(), tmp_path / "monai.pt")
    with pytest.raises(CheckpointError, match="monai.pt: not a swinssl checkpoint"):
        export_weights(tmp_path / "monai.pt", tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="w.bin: the exported file's name must end in .safetensors"):
        export_weights(tmp_path / "monai.pt", tmp_path / "w.bin")
